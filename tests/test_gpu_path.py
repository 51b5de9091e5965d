"""The GPU path's decisions, checked on the CPU: the one device decision, the fusions chosen
from the device and the installed kernels, FP8 settings, the loop chunk's FP8 weight-cache
refresh, the viewless chunk output megatron frees, sampling without host copies of the logits,
and inference without FP8."""

import ast
import os
from functools import partial

import pytest
import torch

from megatron_looprpt import device
from megatron_looprpt.models import fusions
from megatron_looprpt.models.builder import LoopedModelConfig, fp8_settings, transformer_config
from megatron_looprpt.training.flops import peak_for_device_name
from tests.harness.generate_run import PROMPTS, VOCAB, build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
            vocab_size=256, max_position_embeddings=32, loop_steps=2, make_vocab_size_divisible_by=64)
FUSION_FIELDS = ("masked_softmax_fusion", "bias_activation_fusion", "apply_rope_fusion",
                 "gradient_accumulation_fusion", "disable_parameter_transpose_cache",
                 "deallocate_pipeline_outputs")


# -- one device decision -------------------------------------------------------------------------

def _device_decisions(path: str):
    """Calls of torch.cuda.is_available() in a source file."""
    with open(path) as f:
        tree = ast.parse(f.read())
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.cuda.is_available"]


def test_only_the_device_module_asks_whether_cuda_is_available():
    found = {}
    for top in ("megatron_looprpt", "tools", "examples", "pretrain_looprpt.py"):
        path = os.path.join(ROOT, top)
        files = [path] if path.endswith(".py") else [
            os.path.join(d, f) for d, _, names in os.walk(path) for f in names if f.endswith(".py")]
        for file in files:
            lines = _device_decisions(file)
            if lines:
                found[os.path.relpath(file, ROOT)] = lines
    assert list(found) == [os.path.join("megatron_looprpt", "device.py")], found


def test_forced_cpu_on_a_gpu_host_runs_the_cpu_path_everywhere(single_process_parallel, monkeypatch):
    # This machine has no CUDA: anything that still took the GPU path (a .cuda(), a CUDA tensor,
    # the device's name) would raise here.
    from megatron_looprpt.models.loss import ExitLossConfig
    from megatron_looprpt.training.flops import peak_tflops
    from megatron_looprpt.training.objectives import lm_objective
    from megatron_looprpt.models.builder import build_model
    from megatron_looprpt.training.setup import OptimConfig, build_optimizer
    from megatron_looprpt.schedule import make_forward_step, train_step

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # torch's optimizers probe the accelerator themselves (a graph-capture check); with a CUDA
    # build of torch that probe would now find the faked GPU and query a driver that is not there
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)
    monkeypatch.setenv("LOOPRPT_FORCE_CPU", "1")
    assert not device.use_cuda() and device.compute_device() == torch.device("cpu")
    cfg = LoopedModelConfig(**TINY, bf16=False)
    config = transformer_config(cfg, main_grads=True)
    assert config.use_cpu_initialization
    assert not any(getattr(config, name) for name in FUSION_FIELDS)
    assert peak_tflops("bf16") is None
    pm = build_model(cfg, seed=1)
    assert all(p.device.type == "cpu" for p in pm.model.parameters())
    optimizer, scheduler = build_optimizer(pm, cfg, OptimConfig(global_batch_size=2))
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 16),
             "position_ids": torch.arange(16).expand(2, -1)}
    metrics = train_step(pm, optimizer, scheduler, [batch],
                         make_forward_step(partial(lm_objective, cfg=ExitLossConfig())), 2)
    assert metrics["lm_loss"].device.type == "cpu" and torch.isfinite(metrics["lm_loss"])


def test_gpu_host_decides_cuda_unless_forced(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOOPRPT_FORCE_CPU", raising=False)
    assert device.use_cuda()
    monkeypatch.setenv("LOOPRPT_FORCE_CPU", "1")
    assert not device.use_cuda()


# -- fusions ---------------------------------------------------------------------------------------

def _installed(monkeypatch, *modules):
    monkeypatch.setattr(fusions, "_installed", lambda *names: all(n in modules for n in names))


def test_no_fusion_on_the_cpu(monkeypatch):
    _installed(monkeypatch, "transformer_engine", "fused_weight_gradient_mlp_cuda", "scaled_masked_softmax_cuda",
               "scaled_upper_triang_masked_softmax_cuda")
    for impl in ("local", "transformer_engine"):
        chosen = fusions.select(fusions.FusionRequest(), on_gpu=False, transformer_impl=impl, main_grads=True)
        assert not any(chosen.values()), chosen


def test_local_layers_on_a_gpu_without_apex(monkeypatch):
    # megatron-core imports apex's softmax kernels whenever masked_softmax_fusion is on, and its
    # linear layers refuse gradient_accumulation_fusion without fused_weight_gradient_mlp_cuda
    _installed(monkeypatch)
    chosen = fusions.select(fusions.FusionRequest(), on_gpu=True, transformer_impl="local", main_grads=True)
    assert chosen == dict(masked_softmax_fusion=False, bias_activation_fusion=True, apply_rope_fusion=False,
                          gradient_accumulation_fusion=False, disable_parameter_transpose_cache=False,
                          deallocate_pipeline_outputs=True)


def test_local_layers_on_a_gpu_with_apex(monkeypatch):
    _installed(monkeypatch, "fused_weight_gradient_mlp_cuda", "scaled_masked_softmax_cuda",
               "scaled_upper_triang_masked_softmax_cuda")
    chosen = fusions.select(fusions.FusionRequest(), on_gpu=True, transformer_impl="local", main_grads=True)
    assert chosen["masked_softmax_fusion"] and chosen["gradient_accumulation_fusion"]
    # megatron's own linear layers always add into main_grad: the weight cache may stay on
    assert not chosen["disable_parameter_transpose_cache"]


def test_transformer_engine_layers_on_a_gpu_without_apex(monkeypatch):
    _installed(monkeypatch, "transformer_engine")
    chosen = fusions.select(fusions.FusionRequest(), on_gpu=True, transformer_impl="transformer_engine",
                            main_grads=True)
    assert chosen == dict(masked_softmax_fusion=False, bias_activation_fusion=True, apply_rope_fusion=True,
                          gradient_accumulation_fusion=True, disable_parameter_transpose_cache=True,
                          deallocate_pipeline_outputs=True)
    # without DDP's main_grad buffers (teacher, inference) there is nothing to accumulate into
    assert not fusions.select(fusions.FusionRequest(), on_gpu=True, transformer_impl="transformer_engine",
                              main_grads=False)["gradient_accumulation_fusion"]
    off = fusions.FusionRequest(masked_softmax=False, bias_swiglu=False, rope=False, gradient_accumulation=False)
    chosen = fusions.select(off, on_gpu=True, transformer_impl="transformer_engine", main_grads=True)
    assert chosen == dict(masked_softmax_fusion=False, bias_activation_fusion=False, apply_rope_fusion=False,
                          gradient_accumulation_fusion=False, disable_parameter_transpose_cache=False,
                          deallocate_pipeline_outputs=True)


def test_output_layer_fuses_gradient_accumulation_only_with_apex(monkeypatch):
    config = transformer_config(LoopedModelConfig(**TINY))
    config.gradient_accumulation_fusion = True
    _installed(monkeypatch)
    own = fusions.output_layer_config(config)
    assert own is not config and not own.gradient_accumulation_fusion and config.gradient_accumulation_fusion
    _installed(monkeypatch, "fused_weight_gradient_mlp_cuda")
    assert fusions.output_layer_config(config) is config


# -- FP8 settings and MFU peaks -----------------------------------------------------------------

def test_fp8_settings_follow_the_recipe():
    assert fp8_settings(LoopedModelConfig(**TINY)) == {}
    delayed = LoopedModelConfig(**TINY, bf16=True, fp8_format="hybrid", fp8_margin=1, fp8_amax_history_len=16,
                                fp8_amax_compute_algo="most_recent")
    assert fp8_settings(delayed) == dict(fp8="hybrid", fp8_recipe="delayed", fp8_margin=1,
                                         fp8_amax_history_len=16, fp8_amax_compute_algo="most_recent")
    current = LoopedModelConfig(**TINY, bf16=True, fp8_format="e4m3", fp8_recipe="tensorwise")
    assert fp8_settings(current) == dict(fp8="e4m3", fp8_recipe="tensorwise")


def test_mfu_peak_names_the_sku():
    assert peak_for_device_name("NVIDIA H100 80GB HBM3", "bf16").sku == "H100 SXM"
    assert peak_for_device_name("NVIDIA H100 80GB HBM3", "fp8").tflops == 1979.0
    assert peak_for_device_name("NVIDIA H100 PCIe", "bf16").tflops == 756.0
    assert peak_for_device_name("NVIDIA H100 NVL", "fp8").sku == "H100 NVL"
    assert peak_for_device_name("NVIDIA H200", "bf16").sku == "H200 SXM"
    assert peak_for_device_name("NVIDIA GH200 480GB", "bf16").sku == "GH200"
    assert peak_for_device_name("NVIDIA A100-SXM4-80GB", "fp8") is None      # no FP8 tensor cores
    assert peak_for_device_name("NVIDIA L4", "bf16") is None


# -- the loop chunk: FP8 weight-cache refresh, viewless output ---------------------------------

class _RecordingStage(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def set_is_first_microbatch(self):
        self.calls += 1


def test_only_loop_step_0_passes_the_refresh_to_the_shared_stage():
    from megatron_looprpt.models.pipeline import LoopStepChunk

    stage = _RecordingStage()
    model = type("Model", (), {"model_type": None})()
    chunks = [LoopStepChunk(stage, model, v, schedule_config=None) for v in range(4)]
    # megatron's schedules look the method up on the chunk (schedules.forward_step: hasattr)
    assert all(hasattr(chunk, "set_is_first_microbatch") for chunk in chunks)
    for chunk in chunks:
        chunk.set_is_first_microbatch()
    assert stage.calls == 1


def test_chunk_output_is_viewless_so_megatron_can_free_it(single_process_parallel):
    from megatron.core.pipeline_parallel.schedules import custom_backward, deallocate_output_tensor

    from megatron_looprpt.models.builder import build_stage
    from megatron_looprpt.models.init_weights import init_weights

    cfg = LoopedModelConfig(**TINY)
    model = build_stage(cfg)
    init_weights(model, seed=2, std=0.05, effective_depth=4)
    model.loops_inside = False
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(8).expand(2, -1)
    grads = []
    for free in (False, True):
        model.zero_grad()
        # loop step 0 on a last stage: the output carries _AddDeferredGrad (T = 2)
        output = model(tokens, positions, None, labels=tokens, loop_step=0)
        assert output._base is None
        grad = torch.ones_like(output)
        deallocate_output_tensor(output, deallocate_pipeline_outputs=free)
        assert output.numel() == (1 if free else grad.numel())
        if free:
            custom_backward(output, grad)
        else:
            output.backward(grad)
        model.clear_deferred_steps()
        grads.append([p.grad.clone() for p in model.decoder.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# -- sampling and inference without FP8 -----------------------------------------------------------

class _HostCopyRecorder(torch.Tensor):
    """Logits that record every call that would bring them (or what is computed from them) to
    the host."""

    host_calls = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_cpu = name == "to" and any(isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu"
                                      for a in list(args[1:]) + [kwargs.get("device")] if a is not None)
        if name in ("cpu", "tolist", "item", "numpy", "__bool__", "__float__", "__int__") or to_cpu:
            cls.host_calls.append(name)
        return super().__torch_function__(func, types, args, kwargs)


def test_sampling_brings_no_logits_to_the_host():
    from megatron_looprpt.inference.generation import SamplingConfig, _pick

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)).as_subclass(_HostCopyRecorder)
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    for cfg in (SamplingConfig(temperature=0.8, top_p=0.9), SamplingConfig(temperature=0.0)):
        _HostCopyRecorder.host_calls.clear()
        picks = _pick(logits, torch.tensor([2, 2, 2]), cfg, generators, torch.tensor([True, False, True]))
        assert picks.shape == (3, 3)
        assert _HostCopyRecorder.host_calls == [], _HostCopyRecorder.host_calls


def test_sampling_on_the_device_keeps_the_samples(single_process_parallel):
    """The sampler reads the same per-row uniforms as before it moved to the device: with
    known probabilities, the token is the CDF's pick of the row's own uniform."""
    from megatron_looprpt.inference.generation import SamplingConfig, sample

    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    expected = [int(torch.searchsorted(probs[r].cumsum(0), torch.rand((), generator=torch.Generator().manual_seed(s),
                                                                     dtype=torch.float64), right=True))
                for r, s in enumerate((3, 4))]
    assert sample(probs.log().float(), SamplingConfig(), generators).tolist() == expected


def test_generation_runs_without_fp8_and_training_gets_it_back(single_process_parallel):
    from megatron_looprpt.inference.generation import SamplingConfig, generate

    pm = build(1)
    pm.model.config.fp8 = "hybrid"   # as an FP8-trained policy's config (GRPO's rollouts)
    seen = []
    handle = pm.model.decoder.register_forward_pre_hook(lambda module, args: seen.append(module.config.fp8))
    try:
        out = generate(pm, PROMPTS, VOCAB, SamplingConfig(max_new_tokens=3, temperature=0.0))
    finally:
        handle.remove()
    assert out.tokens and seen and set(seen) == {None}
    assert pm.model.config.fp8 == "hybrid"


def test_inference_model_of_an_fp8_checkpoint_is_built_without_fp8(single_process_parallel, tmp_path):
    from megatron_looprpt.arguments import parse_args
    from megatron_looprpt.inference.checkpoint import load_for_inference
    from megatron_looprpt.training import checkpointing

    pm = build(1)
    args = vars(parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                            "--num-query-groups", "2", "--ffn-hidden-size", "96", "--seq-length", "32",
                            "--max-position-embeddings", "64", "--loop-steps", "3", "--tokenizer-type",
                            "NullTokenizer", "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by", "64",
                            "--mock-data", "--transformer-impl", "local"], world_size=1))
    # what an FP8 run saves (validated where Transformer Engine is installed)
    args.update(fp8_format="hybrid", fp8_recipe="delayed", fp8_margin=0, fp8_amax_history_len=1024,
                fp8_amax_compute_algo="max", bf16=False, padded_vocab_size=pm.model.vocab_size)
    checkpointing.save_checkpoint(str(tmp_path), 1, pm, None, None, state={}, args=args)
    model = load_for_inference(str(tmp_path))
    assert model.pm.model.config.fp8 is None
    assert model.args.fp8_format is None and model.args.fp8_recipe is None


# -- the flags -------------------------------------------------------------------------------------

MOCK = ["--model-size", "tiny", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512"]
FP8 = ["--bf16", "--transformer-impl", "transformer_engine", "--fp8-format", "hybrid"]


def _error(argv, monkeypatch, te_version=(2, 8, 0), world_size=1):
    from megatron_looprpt import arguments

    monkeypatch.setattr(arguments, "_te_available", lambda: True)
    monkeypatch.setattr(arguments, "_te_version", lambda: te_version)
    with pytest.raises(arguments.ConfigError) as info:
        arguments.parse_args([*MOCK, *argv], world_size=world_size)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("argv, te_version, flag", [
    (["--fp8-margin", "1"], (2, 8, 0), "--fp8-margin applies to FP8 training"),
    (["--fp8-recipe", "delayed"], (2, 8, 0), "--fp8-recipe applies to FP8 training"),
    ([*FP8, "--fp8-recipe", "tensorwise", "--fp8-amax-history-len", "16"], (2, 8, 0),
     "--fp8-amax-history-len applies to --fp8-recipe delayed"),
    ([*FP8, "--fp8-recipe", "tensorwise"], (2, 1, 0), "--fp8-recipe tensorwise needs Transformer Engine >= 2.2"),
    ([*FP8, "--fp8-recipe", "blockwise"], (2, 2, 0), "--fp8-recipe blockwise needs Transformer Engine >= 2.3"),
    ([*FP8, "--fp8-amax-history-len", "0"], (2, 8, 0), "--fp8-amax-history-len must be >= 1"),
    (["--overlap-param-gather"], (2, 8, 0), "--overlap-param-gather needs --use-distributed-optimizer"),
    (["--overlap-param-gather", "--use-distributed-optimizer", "--rl-algo", "looprpt"], (2, 8, 0),
     "--overlap-param-gather: --rl-algo looprpt"),
    (["--ddp-bucket-size", "0"], (2, 8, 0), "--ddp-bucket-size"),
    (["--num-workers", "-1"], (2, 8, 0), "--num-workers"),
])
def test_gpu_flags_refuse_what_cannot_apply(argv, te_version, flag, monkeypatch):
    assert flag in _error(argv, monkeypatch, te_version)


def test_gpu_flag_defaults(monkeypatch):
    from megatron_looprpt import arguments

    monkeypatch.setattr(arguments, "_te_available", lambda: True)
    monkeypatch.setattr(arguments, "_te_version", lambda: (2, 3, 0))
    plain = arguments.parse_args(MOCK, world_size=1)
    assert (plain.fp8_recipe, plain.fp8_margin, plain.overlap_grad_reduce, plain.overlap_param_gather) == \
           (None, None, True, False)
    assert (plain.masked_softmax_fusion, plain.bias_swiglu_fusion, plain.apply_rope_fusion,
            plain.gradient_accumulation_fusion) == (True, True, True, True)
    fp8 = arguments.parse_args([*MOCK, *FP8], world_size=1)
    assert (fp8.fp8_recipe, fp8.fp8_margin, fp8.fp8_amax_history_len, fp8.fp8_amax_compute_algo) == \
           ("delayed", 0, 1024, "max")
    assert arguments.parse_args([*MOCK, *FP8, "--fp8-recipe", "blockwise"], world_size=1).fp8_margin is None
    distopt = ["--use-distributed-optimizer", "--global-batch-size", "8"]
    assert arguments.parse_args([*MOCK, *distopt], world_size=2).overlap_param_gather is True
    assert arguments.parse_args([*MOCK, *distopt, "--rl-algo", "looprpt"], world_size=2).overlap_param_gather is False
    assert arguments.parse_args([*MOCK, *distopt, "--no-overlap-param-gather"], world_size=2).overlap_param_gather is False


def test_te_version_is_read_without_importing_it():
    from megatron_looprpt.arguments import _leading_numbers

    assert _leading_numbers("2.3.0.dev0+abc123") == (2, 3, 0)
    assert _leading_numbers("2.10.1") == (2, 10, 1) > (2, 3)
    assert _leading_numbers("1.13.0+cu12") == (1, 13, 0) < (2, 2)
