"""Distributed checkpoints: save, resume (under any TP/PP/DP layout) and clean exits on SIGTERM.

A checkpoint is one megatron-core ``dist_checkpointing`` directory per iteration::

    save_dir/
      latest_checkpointed_iteration.txt     the iteration to resume from (the tracker)
      iter_0000200/                         metadata.json, common.pt, torch_dist shards
      iter_0000400/

What is in it, and what survives a change of layout:

* ``model``: ``pm.model.sharded_state_dict()`` of every pipeline stage. Tensors are stored as
  global tensors (layer index as an axis), so a checkpoint saved under one TP/PP/DP loads under
  any other with the same model shape: megatron-core reads each rank's slice.
* ``optimizer``: ``optimizer.sharded_state_dict(model_sd)``. The plain (non-distributed)
  optimizer maps every Adam moment onto its parameter's sharding (keys
  ``optimizer.state.exp_avg.<param key>``), so it reshards across TP/PP/DP exactly like the
  model. The distributed optimizer is saved as ``fully_reshardable``: the DP shards are
  gathered and stored as tensors shaped like their parameters (fp32 main param, exp_avg,
  exp_avg_sq), which also reshards across TP, PP and DP. The gather goes to DP rank 0's CPU
  memory over the gloo DP group (megatron's "mem_efficient" variant): saving needs host memory
  for 3 fp32 copies of that rank's model-parallel shard. (``fully_sharded_model_space``, the
  format megatron-core picks by default, fails in 0.16: it needs ``ShardedTensor.
  flattened_range``, which 0.16 rejects.) A checkpoint saved with one kind of optimizer cannot
  restore the optimizer of the other kind (the common part differs): that load fails with a
  one-line error, or skips the optimizer with ``load_optim=False``.
* ``rng``: python, numpy, torch CPU (+CUDA) and megatron's model-parallel tracker states, one
  ``ShardedObject`` per (pp, tp, dp) rank. They are restored exactly under the same layout and
  skipped with a warning under a different one (a different layout has different generators).
  A model-only checkpoint (``has_rng`` false: the converter's) has none.
* ``extra_models`` (name -> module, e.g. the EMA teacher): ``module.sharded_state_dict()``
  under ``<name>.`` keys; they reshard like the model.
* common (rank 0): the scheduler's state, the caller's ``state`` and ``args`` (JSON-able; both
  are normalised through JSON so that they load with ``torch.load(weights_only=True)``), the
  layout and the iteration.

Loading tolerates a checkpoint without the layers' ``_extra_state`` objects (a converted
checkpoint: Transformer Engine's FP8 metadata then starts fresh); any other absent entry is an
error.

Publishing is atomic: every rank writes into ``save_dir/.tmp_iter_XXXXXXX_<unique>``; after a
barrier rank 0 renames it to ``iter_XXXXXXX`` and then replaces the tracker (write to a temp
file, fsync, ``os.replace``). A process killed at any point leaves the previous checkpoint and
tracker as they were; the half-written temp directory is ignored by ``load_checkpoint`` and
removed by the next ``save_checkpoint``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_looprpt.device import use_cuda

logger = logging.getLogger(__name__)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 1
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_TMP_PREFIX = ".tmp_iter_"
_ASIDE_PREFIX = ".old_iter_"
# The distributed optimizer's format that reshards across TP, PP and DP.
_DIST_OPT_SHARDING = "fully_reshardable"
_RNG_KEY = "rng_state"


def _prepare_megatron() -> None:
    """Work around megatron-core 0.16 quirks before a save or load.

    * The torch_dist writer forks one process per write bucket, and each calls
      ``filesystem_async._process_memory()`` (debug logging only) *outside* its error handling:
      without psutil that raises in the child, the parent waits forever on the work queue and
      the save hangs. Without psutil, report 0 bytes instead.
    * The writer hands its results back through a queue of a *spawned* multiprocessing Manager,
      created on the first save of a process: a fresh interpreter that re-imports the main
      module (seconds) and is torn down at exit (seconds more). Our saves are synchronous, so
      the writer puts and gets the results in this very process: a plain ``queue.Queue`` does.
      (An async save through megatron-core in the same process would need the Manager queue.)
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not getattr(filesystem_async, "HAVE_PSUTIL", True):
        filesystem_async._process_memory = lambda: 0
    if getattr(filesystem_async, "_results_queue", 0) is None:
        filesystem_async._results_queue = queue.Queue()


try:  # torch.distributed.checkpoint's error derives from BaseException, not Exception
    from torch.distributed.checkpoint.api import CheckpointException as _DcpError

    _LOAD_ERRORS = (Exception, _DcpError)
except ImportError:  # pragma: no cover
    _LOAD_ERRORS = (Exception,)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line and names the path."""


@dataclass
class LoadedCheckpoint:
    iteration: int
    state: Dict[str, Any]
    args: Dict[str, Any]
    path: str = ""
    optimizer_loaded: bool = False
    rng_loaded: bool = False
    saved_layout: Dict[str, int] = field(default_factory=dict)
    # names of the ``extra_models`` restored (those the checkpoint holds)
    extra_models: List[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------
def checkpoint_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def tracker_path(save_dir: str) -> str:
    return os.path.join(save_dir, TRACKER_FILENAME)


def is_complete(path: str) -> bool:
    """A directory megatron-core finished writing: metadata.json is written last, after the
    shards, and common.pt holds everything but the shards."""
    return (os.path.isfile(os.path.join(path, "metadata.json"))
            and os.path.isfile(os.path.join(path, "common.pt")))


def list_iterations(save_dir: str) -> List[int]:
    """Iterations of the published ``iter_*`` directories, ascending (temp dirs excluded)."""
    if not os.path.isdir(save_dir):
        return []
    found = []
    for name in os.listdir(save_dir):
        match = _ITER_RE.match(name)
        if match and os.path.isdir(os.path.join(save_dir, name)):
            found.append(int(match.group(1)))
    return sorted(found)


def _previous_hint(save_dir: str, iteration: Optional[int]) -> str:
    older = [it for it in list_iterations(save_dir)
             if (iteration is None or it < iteration) and is_complete(checkpoint_dir(save_dir, it))]
    if not older:
        return "no earlier complete checkpoint exists in " + save_dir
    prev = checkpoint_dir(save_dir, older[-1])
    return (f"the previous complete checkpoint is iteration {older[-1]} ({prev}): load it directly "
            f"or write {older[-1]} into {tracker_path(save_dir)}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe(exc: BaseException) -> str:
    """The root cause of a (possibly torch.distributed.checkpoint-wrapped) error, one line."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, wrapped = sorted(failures.items())[0]
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        if isinstance(inner, BaseException):
            return f"rank {rank}: {_describe(inner)}"
    return f"{type(exc).__name__}: {_one_line(exc)[:300]}"


def _read_tracker(save_dir: str) -> Optional[int]:
    path = tracker_path(save_dir)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(
            f"checkpoint tracker {path} is corrupt (holds {text[:40]!r}, expected an iteration "
            f"number); {_previous_hint(save_dir, None)}") from None


def resolve_checkpoint(load_dir: str) -> Optional[Tuple[str, Optional[int]]]:
    """(checkpoint directory, iteration) to load from ``load_dir``, or None if it holds none.

    ``load_dir`` is a save directory (its tracker is followed; without one, the newest complete
    ``iter_*`` directory is used) or one checkpoint directory itself. Raises ``CheckpointError``
    when the tracker points to a missing or incomplete directory.
    """
    if not load_dir or not os.path.isdir(load_dir):
        return None
    if is_complete(load_dir) or os.path.isfile(os.path.join(load_dir, "common.pt")):
        match = _ITER_RE.match(os.path.basename(os.path.normpath(load_dir)))
        path = os.path.normpath(load_dir)
        if not is_complete(path):
            raise CheckpointError(
                f"checkpoint {path} is incomplete or corrupt (no metadata.json); "
                f"{_previous_hint(os.path.dirname(path), int(match.group(1)) if match else None)}")
        return path, int(match.group(1)) if match else None
    iteration = _read_tracker(load_dir)
    if iteration is None:
        complete = [it for it in list_iterations(load_dir) if is_complete(checkpoint_dir(load_dir, it))]
        if not complete:
            if list_iterations(load_dir):
                raise CheckpointError(
                    f"{load_dir} has iter_* directories but none is complete and there is no "
                    f"{TRACKER_FILENAME}")
            return None
        logger.warning("no %s in %s; loading the newest complete checkpoint, iteration %d",
                       TRACKER_FILENAME, load_dir, complete[-1])
        iteration = complete[-1]
    path = checkpoint_dir(load_dir, iteration)
    if not os.path.isdir(path):
        aside = _aside_copy(load_dir, iteration)
        if aside is not None:
            # A save of the same iteration was killed between moving the old copy aside and
            # renaming the new one into place; the old copy is complete and still valid.
            logger.warning("%s is missing; using its complete copy %s", path, aside)
            return aside, iteration
        raise CheckpointError(
            f"checkpoint tracker {tracker_path(load_dir)} points to iteration {iteration} but "
            f"{path} does not exist; {_previous_hint(load_dir, iteration)}")
    if not is_complete(path):
        raise CheckpointError(
            f"checkpoint {path} is incomplete or corrupt (missing metadata.json or common.pt); "
            f"{_previous_hint(load_dir, iteration)}")
    return path, iteration


def _aside_copy(save_dir: str, iteration: int) -> Optional[str]:
    prefix = f"{_ASIDE_PREFIX}{iteration:07d}_"
    for name in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, name)
        if name.startswith(prefix) and os.path.isdir(path) and is_complete(path):
            return path
    return None


def _load_common(path: str) -> Dict[str, Any]:
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as exc:  # noqa: BLE001 - turned into one line naming the path
        raise CheckpointError(
            f"cannot read the common state of checkpoint {path} ({_describe(exc)}); "
            f"{_previous_hint(os.path.dirname(path), _iteration_of(path))}"
        ) from exc
    if not isinstance(common, dict) or "looprpt" not in common:
        raise CheckpointError(f"{path} is not a megatron_looprpt checkpoint (no 'looprpt' entry)")
    return common


def _iteration_of(path: str) -> Optional[int]:
    match = _ITER_RE.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def read_checkpoint_args(load_dir: str) -> Optional[Dict[str, Any]]:
    """The ``args`` saved with the checkpoint ``load_dir`` resolves to, or None if there is none.

    Reads only the common state (common.pt): no model, no process group, no megatron state.
    """
    resolved = resolve_checkpoint(load_dir)
    if resolved is None:
        return None
    common = _load_common(resolved[0])
    return common["looprpt"]["args"]


def read_checkpoint_info(load_dir: str) -> Optional[Dict[str, Any]]:
    """Iteration, path, layout, args and state of the checkpoint, without loading tensors."""
    resolved = resolve_checkpoint(load_dir)
    if resolved is None:
        return None
    info = dict(_load_common(resolved[0])["looprpt"])
    info["path"] = resolved[0]
    return info


# --------------------------------------------------------------------------------------------
# what a rank contributes
# --------------------------------------------------------------------------------------------
def current_layout() -> Dict[str, int]:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(with_context_parallel=True),
        "world_size": dist.get_world_size(),
    }


def _layout_ranks() -> Tuple[int, int, int]:
    return (parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(with_context_parallel=True))


def get_rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's state as plain python + a tensor so it loads with weights_only=True
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "torch_cpu": torch.get_rng_state(),
        "tracker": {name: state.clone() for name, state in get_cuda_rng_tracker().get_states().items()},
    }
    if use_cuda() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(_as_python_rng_state(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and use_cuda():
        torch.cuda.set_rng_state(state["torch_cuda"])
    get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})


def _as_python_rng_state(value):
    version, internal, gauss = value
    return version, tuple(internal), gauss


def _rng_sharded_object(data) -> ShardedObject:
    layout = current_layout()
    return ShardedObject(_RNG_KEY, data, (layout["pp"], layout["tp"], layout["dp"]), _layout_ranks(),
                         replica_id=0)


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def _prime_distributed_optimizer(optimizer) -> None:
    """megatron-core quirk: with torch's Adam (no Apex / Transformer Engine) the distributed
    optimizer's ``state_dict()`` asserts that its parameters share one Adam ``step``, so before
    the first step it can neither be saved nor build the state dict a load fills in. Give every
    main parameter the state torch's Adam would create on its first step (zero moments, step 0):
    the optimizer then behaves exactly as a fresh one, and a load overwrites all of it."""
    from megatron.core.optimizer import distrib_optimizer

    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if not isinstance(opt, distrib_optimizer.DistributedOptimizer):
            continue
        inner = opt.optimizer
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                if len(inner.state[param]) == 0:
                    inner.state[param] = {
                        "step": torch.tensor(0.0, dtype=torch.float32),
                        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                    }


def _load_optimizer_state(optimizer, state_dict) -> None:
    """``optimizer.load_state_dict`` with a workaround for the distributed optimizer.

    megatron-core quirk: ``DistributedOptimizer.load_parameter_state_from_fully_reshardable``
    copies every entry of the inner optimizer's per-parameter state from the checkpoint, but the
    checkpoint (by design) holds no ``step`` there while torch's Adam always keeps one: KeyError.
    The parameter state is therefore loaded here with ``step`` held aside (it is restored from
    the param groups by ``load_state_dict`` just before).

    A second quirk of the same path: ``DistributedOptimizer.load_state_dict`` gives every
    parameter the *same* ``step`` tensor, and torch's Adam (no Apex / TE) increments each
    parameter's step in place, so after a resume the shared step advanced once per parameter per
    iteration and the bias correction was wrong. Steps are unshared afterwards."""
    from megatron.core.optimizer import distrib_optimizer

    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is None:
        pairs = [(optimizer, state_dict)]
    elif len(chained) == 1:
        pairs = [(chained[0], state_dict)]
    else:
        items = state_dict.items() if isinstance(state_dict, dict) else enumerate(state_dict)
        pairs = list(zip(chained, (v for _, v in sorted(items))))
    for opt, sd in pairs:
        if not (isinstance(opt, distrib_optimizer.DistributedOptimizer) and "param_state" in sd):
            opt.load_state_dict(sd)
            continue
        sd = dict(sd)
        param_state = sd.pop("param_state")
        sharding_type = sd.pop("param_state_sharding_type", None)
        if sharding_type != "fully_reshardable":
            sd["param_state"], sd["param_state_sharding_type"] = param_state, sharding_type
            opt.load_state_dict(sd)
            continue
        opt.load_state_dict(sd)
        inner_state = opt.optimizer.state
        held = {p: st.pop("step") for p, st in inner_state.items() if "step" in st}
        try:
            opt.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for param, step in held.items():
                inner_state[param]["step"] = step
    _unshare_adam_steps(optimizer)
    if chained is not None and len(chained) > 1 and hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()


def _unshare_adam_steps(optimizer) -> None:
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        seen = set()
        for state in inner.state.values():
            step = state.get("step")
            if torch.is_tensor(step):
                if id(step) in seen:
                    state["step"] = step.clone()
                seen.add(id(state["step"]))


def _common_for_consistency_check(common: Dict[str, Any]) -> Dict[str, Any]:
    """What megatron-core compares across ranks before saving the common state: without the
    distributed optimizer's gathered parameter state, which only DP rank 0 holds by design."""
    common = dict(common)
    optim = common.get("optimizer")
    if isinstance(optim, dict) and "param_state" in optim:
        common["optimizer"] = {k: v for k, v in optim.items() if k != "param_state"}
    return common


def _optimizer_metadata(optimizer) -> Dict[str, Any]:
    return {
        "distrib_optim_sharding_type": _DIST_OPT_SHARDING,
        # megatron-core's default all_gathers every DP shard onto every DP rank's GPU
        # (3 fp32 copies of the rank's model-parallel shard of the model, on the GPU; and
        # ``Tensor.cuda()``, which the CPU bridge cannot redirect). The memory-efficient variant
        # gathers in CPU memory of DP rank 0 over the gloo DP group. Both load the same way.
        "distrib_optim_fully_reshardable_mem_efficient": True,
        "chained_optim_avoid_prefix": True,
        "kind": "distributed" if _is_distributed_optimizer(optimizer) else "plain",
    }


def _sharding_metadata(meta: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in meta.items() if k != "kind"}


def _jsonable(value: Any, what: str) -> Any:
    """``value`` through JSON, so the common state loads with ``weights_only=True``. A value
    JSON cannot hold is stored as its ``str()`` (with a warning) rather than failing a save
    hours into a run."""
    def fallback(obj):
        logger.warning("checkpoint %s: %r is not JSON-serialisable, stored as a string", what, obj)
        return str(obj)

    return json.loads(json.dumps(value, default=fallback))


_RESERVED = {"model", "optimizer", "scheduler", "looprpt", _RNG_KEY}


def _check_extra_models(extra_models) -> Dict[str, Any]:
    extra_models = dict(extra_models or {})
    for name in extra_models:
        if name in _RESERVED or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise ValueError(f"extra model name {name!r} is reserved or not an identifier")
    return extra_models


def _unprefix(state_dict: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def _load_module(module, state_dict, path: str, what: str) -> None:
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the {what}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------
def _broadcast_from_rank0(value):
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _fsync_path(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str, rank: int, world: int) -> None:
    """Make the checkpoint durable before it is published; ranks share the files."""
    files, dirs = [], []
    for here, subdirs, names in os.walk(root):
        dirs.append(here)
        files.extend(os.path.join(here, n) for n in names)
    for path in sorted(files)[rank::world]:
        _fsync_path(path)
    if rank == 0:
        for path in dirs:
            _fsync_path(path, directory=True)


def _clean_stale(save_dir: str) -> None:
    """Rank 0, before a save: drop what killed saves left behind."""
    for name in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, name)
        if name.startswith(_ASIDE_PREFIX) and os.path.isdir(path):
            match = re.match(rf"^{re.escape(_ASIDE_PREFIX)}(\d+)_", name)
            final = checkpoint_dir(save_dir, int(match.group(1))) if match else None
            if final and not os.path.exists(final) and is_complete(path):
                # killed between moving the old copy aside and publishing the new one: the old
                # copy is what the tracker means, put it back
                logger.warning("restoring %s from %s", final, path)
                os.rename(path, final)
            else:
                shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(_TMP_PREFIX) and os.path.isdir(path):
            logger.warning("removing incomplete checkpoint %s left by an interrupted save", path)
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(TRACKER_FILENAME + ".tmp"):
            os.remove(path)


def _write_tracker(save_dir: str, iteration: int) -> None:
    final = tracker_path(save_dir)
    tmp = f"{final}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_path(save_dir, directory=True)


def _publish(tmp: str, final: str, unique: str) -> None:
    """Rank 0: move the finished temp directory to its final name."""
    aside = None
    if os.path.exists(final):
        aside = os.path.join(os.path.dirname(final),
                             f"{_ASIDE_PREFIX}{os.path.basename(final)[len('iter_'):]}_{unique}")
        os.rename(final, aside)
    os.rename(tmp, final)
    _fsync_path(os.path.dirname(final), directory=True)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _apply_keep(save_dir: str, iteration: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints at or below ``iteration`` (the one just written is
    always among them). Iterations above it (an abandoned later run) are left alone."""
    older = [it for it in list_iterations(save_dir) if it < iteration]
    for it in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(checkpoint_dir(save_dir, it), ignore_errors=True)


def save_checkpoint(save_dir: str, iteration: int, pm, optimizer, scheduler, state: Dict[str, Any],
                    args: Dict[str, Any], keep: Optional[int] = None,
                    extra_models: Optional[Dict[str, Any]] = None) -> str:
    """Save iteration ``iteration`` to ``save_dir/iter_{iteration:07d}`` (collective: every rank
    of the world calls it). Returns the checkpoint directory.

    ``state``: the caller's resumable state (consumed samples, data position, ...; JSON-able,
    rank 0's copy is kept). ``state['no_optim']`` skips the optimizer. ``args``: the run's
    arguments (JSON-able), readable later with ``read_checkpoint_args``. ``keep``: keep only the
    newest ``keep`` checkpoints. ``extra_models``: name -> module with ``sharded_state_dict``
    (e.g. an EMA teacher, sharded like the student); saved under ``<name>.`` keys, so they
    reshard like the model.
    """
    extra_models = _check_extra_models(extra_models)
    if keep is not None and keep < 1:
        raise ValueError("keep must be >= 1")
    state = dict(state or {})
    _prepare_megatron()
    model_sd = pm.model.sharded_state_dict()
    save_optim = optimizer is not None and not state.get("no_optim")
    sharded = {"model": model_sd, _RNG_KEY: _rng_sharded_object(get_rng_state())}
    optim_meta = None
    if save_optim:
        optim_meta = _optimizer_metadata(optimizer)
        _prime_distributed_optimizer(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=False, metadata=_sharding_metadata(optim_meta))
    for name, module in extra_models.items():
        sharded[name] = module.sharded_state_dict(prefix=f"{name}.")
    if scheduler is not None:
        sharded["scheduler"] = scheduler.state_dict()
    meta = checkpoint_meta(iteration, current_layout(), args, state=state, optimizer=optim_meta,
                           extra_models=sorted(extra_models))
    return write_checkpoint(save_dir, iteration, sharded, meta, keep=keep)


def checkpoint_meta(iteration: int, layout: Dict[str, int], args: Dict[str, Any],
                    state: Optional[Dict[str, Any]] = None, optimizer: Optional[Dict[str, Any]] = None,
                    extra_models: Optional[List[str]] = None, has_rng: bool = True) -> Dict[str, Any]:
    """The ``looprpt`` entry of a checkpoint's common state: what reading it needs without
    loading tensors. ``has_rng`` is False for model-only checkpoints (the converter's)."""
    return {
        "version": CHECKPOINT_VERSION,
        "iteration": int(iteration),
        "layout": dict(layout),
        "optimizer": optimizer,
        "extra_models": list(extra_models or []),
        "has_rng": has_rng,
        "state": _jsonable(dict(state or {}), "state"),
        "args": _jsonable(args or {}, "args"),
    }


def write_checkpoint(save_dir: str, iteration: int, sharded: Dict[str, Any], meta: Dict[str, Any],
                     keep: Optional[int] = None, sharded_strategy=None) -> str:
    """Write ``sharded`` (+ ``meta`` as its ``looprpt`` entry) to ``save_dir/iter_{iteration:07d}``
    and publish it atomically (collective). ``sharded_strategy``: megatron-core's save strategy
    (default torch_dist); the converter passes one that materialises tensors lazily."""
    _prepare_megatron()
    rank, world = dist.get_rank(), dist.get_world_size()
    started = time.time()
    save_dir = os.path.abspath(save_dir)
    final = checkpoint_dir(save_dir, iteration)

    unique = None
    if rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        _clean_stale(save_dir)
        unique = f"{int(time.time())}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    unique = _broadcast_from_rank0(unique)
    tmp = os.path.join(save_dir, f"{_TMP_PREFIX}{iteration:07d}_{unique}")
    if rank == 0:
        os.makedirs(tmp)
    dist.barrier()

    sharded = {**sharded, "looprpt": meta}
    dist_checkpointing.save(sharded, tmp, sharded_strategy=sharded_strategy,
                            preprocess_common_before_consistancy_check=_common_for_consistency_check)
    _fsync_tree(tmp, rank, world)
    dist.barrier()
    if rank == 0:
        _publish(tmp, final, unique)
        _write_tracker(save_dir, iteration)
        if keep is not None:
            _apply_keep(save_dir, iteration, keep)
        logger.info("saved checkpoint %s in %.2fs", final, time.time() - started)
    dist.barrier()
    return final


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------
def load_checkpoint(load_dir: str, pm, optimizer, scheduler, load_optim: bool = True,
                    load_rng: bool = True,
                    extra_models: Optional[Dict[str, Any]] = None) -> Optional[LoadedCheckpoint]:
    """Restore model (optimizer and scheduler unless ``load_optim`` is False, and RNG) from
    ``load_dir``; None if it holds no checkpoint. Collective. The current layout may differ from
    the saved one: megatron-core reads each rank's slices of the global tensors. RNG states are
    restored only under the same layout (skipped with a warning otherwise). ``extra_models`` (name -> module) are restored
    when the checkpoint holds them (``LoadedCheckpoint.extra_models`` lists those) and left as
    they are otherwise."""
    extra_models = _check_extra_models(extra_models)
    resolved = resolve_checkpoint(load_dir)
    if resolved is None:
        return None
    path, _ = resolved
    common = _load_common(path)
    meta = common["looprpt"]
    iteration = int(meta["iteration"])
    hint = _previous_hint(os.path.dirname(path), _iteration_of(path))

    _prepare_megatron()
    model_sd = pm.model.sharded_state_dict()
    sharded: Dict[str, Any] = {"model": model_sd}
    saved_extra = set(meta.get("extra_models", []))
    restore_extra = [name for name in extra_models if name in saved_extra]
    for name in restore_extra:
        sharded[name] = extra_models[name].sharded_state_dict(prefix=f"{name}.")

    restore_optim = False
    if load_optim and optimizer is not None:
        saved = meta.get("optimizer")
        wanted = _optimizer_metadata(optimizer)
        if saved is None:
            logger.warning("checkpoint %s holds no optimizer state; the optimizer starts fresh", path)
        elif saved["kind"] != wanted["kind"]:
            raise CheckpointError(
                f"checkpoint {path} holds a {saved['kind']} optimizer but this run uses a "
                f"{wanted['kind']} one; load without the optimizer state (load_optim=False)")
        else:
            restore_optim = True
            _prime_distributed_optimizer(optimizer)
            load_meta = _sharding_metadata(wanted)
            load_meta["distrib_optim_sharding_type"] = saved["distrib_optim_sharding_type"]
            sharded["optimizer"] = optimizer.sharded_state_dict(
                model_sd, is_loading=True, metadata=load_meta)

    restore_rng = False
    if load_rng and meta.get("has_rng", True):
        saved_layout = meta["layout"]
        now = current_layout()
        if all(saved_layout[k] == now[k] for k in ("tp", "pp", "dp")):
            restore_rng = True
            sharded[_RNG_KEY] = _rng_sharded_object(None)
        elif dist.get_rank() == 0:
            logger.warning(
                "checkpoint %s was saved with TP=%d PP=%d DP=%d, this run has TP=%d PP=%d DP=%d: "
                "RNG states are not restored", path, saved_layout["tp"], saved_layout["pp"],
                saved_layout["dp"], now["tp"], now["pp"], now["dp"])

    try:
        # A converted checkpoint (tools/checkpoint/convert.py) holds weights only, without the
        # layers' _extra_state objects (FP8 metadata under Transformer Engine, empty otherwise):
        # those may be absent; any other requested key that is absent is an error.
        loaded, _, absent = dist_checkpointing.load(sharded, path, strict=StrictHandling.RETURN_UNEXPECTED)
    except _LOAD_ERRORS as exc:  # turned into one line naming the path
        raise CheckpointError(
            f"cannot load checkpoint {path} ({_describe(exc)}); {hint}"
        ) from exc
    absent = sorted(k for k in absent if not k.endswith("_extra_state"))
    if absent:
        raise CheckpointError(f"checkpoint {path} lacks {len(absent)} entries this run needs, e.g. "
                              f"{', '.join(absent[:3])}; {hint}")

    _load_module(pm.model, loaded["model"], path, "model")
    for name in restore_extra:
        _load_module(extra_models[name], _unprefix(loaded[name], f"{name}."), path, name)
    if restore_optim:
        _load_optimizer_state(optimizer, loaded["optimizer"])
    elif optimizer is not None and hasattr(optimizer, "reload_model_params"):
        # mixed precision: main (fp32) params start from the loaded model params
        optimizer.reload_model_params()
    # the schedule belongs with the optimizer state: a fresh optimizer (load_optim=False, as
    # --finetune and --no-load-optim ask) starts the run's own schedule from its beginning
    if load_optim and scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    if restore_rng:
        set_rng_state(loaded[_RNG_KEY])
    dist.barrier()
    if dist.get_rank() == 0:
        logger.info("loaded checkpoint %s (iteration %d)", path, iteration)
    return LoadedCheckpoint(iteration=iteration, state=meta["state"], args=meta["args"], path=path,
                            optimizer_loaded=restore_optim, rng_loaded=restore_rng,
                            saved_layout=dict(meta["layout"]), extra_models=restore_extra)


# --------------------------------------------------------------------------------------------
# SIGTERM
# --------------------------------------------------------------------------------------------
class SigtermHandler:
    """Record SIGTERM/SIGINT instead of dying, so the loop can save and exit at an iteration
    boundary::

        with SigtermHandler() as sigterm:
            for it in ...:
                train_step(...)
                if sigterm.received():        # collective: every rank calls it
                    save_checkpoint(...); break

    ``received()`` all-reduces the flag over the world group, so every rank agrees as soon as
    any rank got the signal. While the handler is installed a signal never interrupts the
    process (a second one is recorded too); use SIGKILL to force. The previous handlers are
    restored on exit.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), group=None):
        self.signals = tuple(signals)
        self.group = group
        self._received = False
        self.signal_number: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self._received = True
        self.signal_number = signum

    def __enter__(self) -> "SigtermHandler":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        else:
            logger.warning("SigtermHandler entered outside the main thread: signals not handled")
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def received_locally(self) -> bool:
        return self._received

    def received(self) -> bool:
        """True on every rank if any rank received a signal (collective over ``group``)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self._received
        device = torch.device("cpu")
        if dist.get_backend(self.group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        flag = torch.tensor([1 if self._received else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
