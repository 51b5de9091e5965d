"""Run megatron-core on CPU with the gloo backend.

megatron-core assumes a CUDA device in a handful of places that have nothing to do with the
maths: buffers allocated on ``torch.cuda.current_device()``, scalars created with
``device='cuda'``, the CUDA generator behind its RNG tracker, streams and synchronisation, and a
few ``Tensor.type() == 'torch.cuda.FloatTensor'`` assertions. This module is the only place that
knows about that. ``install()`` is called once per process by ``parallel.initialize`` when the
device is CPU, and never on a GPU, so a GPU cluster runs megatron-core untouched and a CPU run
executes the very same megatron-core code paths (layers, schedules, DDP, optimizer, checkpoints).

How: every loaded ``megatron.core`` module gets a module-local stand-in for its ``torch`` global.
The stand-in forwards everything to torch, except that
  * tensor factories map ``device='cuda'`` to the CPU,
  * ``torch.cuda`` answers with the CPU: current device, streams (no-ops), synchronize, and the
    RNG functions, which act on the CPU default generator (the CPU generator *is* the device
    generator here, so megatron's model-parallel RNG tracker forks it exactly as it forks the
    CUDA one on a GPU).
The type-string checks are satisfied by running the few functions that contain them with
``Tensor.type()`` reporting CUDA names for CPU tensors. A tensor method is called directly in
two places: ``LanguageModule.setup_embeddings_and_output_layer`` moves the tied embedding to the
GPU with ``.cuda()`` before all-reducing it between the first and last pipeline stages (on CPU
the same all-reduce runs where the weight lies), and the fully parallel checkpoint load moves
what it exchanges between ranks to the GPU (``.cuda()``, ``ShardedTensor.init_data("cuda")``):
on CPU it stays there.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types

import torch

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}
_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor",
)
_installed = False


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


def _cpu_factory(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        # Pinned memory needs a CUDA context.
        kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    return wrapper


class _NullStream:
    """Streams collapse to program order on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return None


class _CudaOnCpu(types.SimpleNamespace):
    """What ``torch.cuda`` means inside megatron-core when the device is the CPU."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _make_cuda_stand_in():
    def get_rng_state(device=None):
        return torch.get_rng_state()

    def set_rng_state(state, device=None):
        torch.set_rng_state(state)

    def manual_seed(seed):
        torch.manual_seed(seed)

    return _CudaOnCpu(
        current_device=lambda: torch.device("cpu"),
        device_count=lambda: 1,
        Stream=_NullStream,
        stream=lambda stream=None: contextlib.nullcontext(),
        current_stream=lambda device=None: _NullStream(),
        default_stream=lambda device=None: _NullStream(),
        synchronize=lambda device=None: None,
        empty_cache=lambda: None,
        get_rng_state=get_rng_state,
        set_rng_state=set_rng_state,
        manual_seed=manual_seed,
        manual_seed_all=manual_seed,
        random=types.SimpleNamespace(get_rng_state=get_rng_state, set_rng_state=set_rng_state),
        memory_allocated=lambda device=None: 0,
        max_memory_allocated=lambda device=None: 0,
        reset_peak_memory_stats=lambda device=None: None,
    )


class _TorchOnCpu(types.ModuleType):
    """Module-local ``torch`` for megatron-core modules: torch, with CUDA mapped to the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _make_cuda_stand_in()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def _cuda_type_names():
    """Make ``Tensor.type()`` (no arguments) report CUDA type names for CPU tensors."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


def _patch_type_checks():
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(
        clip_grads.clip_grad_by_total_norm_fp32
    )
    optim_cls = optimizer.Float16OptimizerWithFloat16Params
    optim_cls.__init__ = _with_cuda_type_names(optim_cls.__init__)
    dist_cls = distrib_optimizer.DistributedOptimizer
    dist_cls.__init__ = _with_cuda_type_names(dist_cls.__init__)
    # The optimizer module imported the function by name; keep both references in step.
    for module in list(sys.modules.values()):
        if getattr(module, "clip_grad_by_total_norm_fp32", None) is not None and module is not clip_grads:
            if getattr(module, "__name__", "").startswith("megatron.core"):
                module.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32


def _patch_rng():
    from megatron.core.tensor_parallel import random

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    random._get_cuda_rng_state = get_state
    random._set_cuda_rng_state = set_state


_LAZILY_IMPORTED = (
    # dist_checkpointing imports its save/load strategies on first use.
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
)


def _import_megatron_modules():
    # Import everything the framework touches before swapping module globals, so no module that
    # is loaded later escapes the stand-in.
    import importlib

    for name in _LAZILY_IMPORTED:
        importlib.import_module(name)
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.distributed  # noqa: F401
    import megatron.core.distributed.finalize_model_grads  # noqa: F401
    import megatron.core.inference.contexts  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401  (attention, MLP: their KV-cache buffers)
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.optimizer_param_scheduler  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401
    import megatron.core.pipeline_parallel.schedules  # noqa: F401
    import megatron.core.tensor_parallel  # noqa: F401
    import megatron.core.transformer.transformer_block  # noqa: F401


def _patch_tied_embedding_sync():
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(original)
    def setup_embeddings_and_output_layer(self):
        in_group = self._is_in_embd_group()
        # megatron's own sync would call weight.data.cuda(): run the rest of the setup without
        # it (an instance attribute shadows the method), then the same all-reduce on the CPU
        self._is_in_embd_group = lambda: False
        try:
            original(self)
        finally:
            del self._is_in_embd_group
        if in_group and self.share_embeddings_and_output_weights and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.shared_embedding_or_output_weight().data, group=self.embd_group)

    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


@contextlib.contextmanager
def _cuda_method_is_identity():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _patch_checkpoint_exchange():
    from megatron.core.dist_checkpointing import exchange_utils
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    init_data = ShardedTensor.init_data

    @functools.wraps(init_data)
    def init_data_on_cpu(self, device, init_fn=torch.empty):
        return init_data(self, _to_cpu_device(device), init_fn)

    ShardedTensor.init_data = init_data_on_cpu
    exchange = exchange_utils.exchange_by_distribution

    @functools.wraps(exchange)
    def exchange_on_cpu(*args, **kwargs):
        with _cuda_method_is_identity():
            return exchange(*args, **kwargs)

    # the load strategies imported the function by name; keep every reference in step
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "exchange_by_distribution", None) is exchange:
            module.exchange_by_distribution = exchange_on_cpu


def install() -> None:
    """Point megatron-core at the CPU. Idempotent; call before building models or optimizers."""
    global _installed
    _import_megatron_modules()
    stand_in = _TorchOnCpu()
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = stand_in
    if not _installed:
        _patch_rng()
        _patch_type_checks()
        _patch_tied_embedding_sync()
        _patch_checkpoint_exchange()
        _installed = True


def is_installed() -> bool:
    return _installed
