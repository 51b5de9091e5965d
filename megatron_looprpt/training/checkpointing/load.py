"""Resuming: model, optimizer, scheduler, RNG and extra models, under any TP/PP/DP layout.

The tensors are global, so megatron-core reads each rank's slices whatever layout saved them;
the data-parallel ranks share the reading of replicated tensors (the fully parallel load
wrapper). RNG states are restored only under the layout that saved them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_looprpt.training.checkpointing import megatron_io, optimizer_state
from megatron_looprpt.training.checkpointing.files import (
    CheckpointError,
    iteration_of,
    previous_hint,
    resolve_checkpoint,
)
from megatron_looprpt.training.checkpointing.meta import check_extra_models, describe, read_common
from megatron_looprpt.training.checkpointing.rng import (
    RNG_KEY,
    current_layout,
    rng_sharded_object,
    same_layout,
    set_rng_state,
)

logger = logging.getLogger(__name__)


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


def load_checkpoint(load_dir: str, pm, optimizer, scheduler, load_optim: bool = True,
                    load_rng: bool = True,
                    extra_models: Optional[Dict[str, Any]] = None) -> Optional[LoadedCheckpoint]:
    """Restore model (optimizer and scheduler unless ``load_optim`` is False, and RNG) from
    ``load_dir``; None if it holds no checkpoint. Collective. The current layout may differ from
    the saved one. RNG states are restored only under the same layout (skipped with a warning
    otherwise). ``extra_models`` (name -> module) are restored when the checkpoint holds them
    (``LoadedCheckpoint.extra_models`` lists those) and left as they are otherwise."""
    extra_models = check_extra_models(extra_models)
    resolved = resolve_checkpoint(load_dir)
    if resolved is None:
        return None
    path, _ = resolved
    meta = read_common(path)["looprpt"]
    iteration = int(meta["iteration"])
    hint = previous_hint(os.path.dirname(path), iteration_of(path))

    model_sd = pm.model.sharded_state_dict()
    sharded: Dict[str, Any] = {"model": model_sd}
    saved_extra = set(meta.get("extra_models", []))
    restore_extra = [name for name in extra_models if name in saved_extra]
    for name in restore_extra:
        sharded[name] = extra_models[name].sharded_state_dict(prefix=f"{name}.")

    restore_optim = load_optim and optimizer is not None and _optimizer_matches(meta, optimizer, path)
    if restore_optim:
        optimizer_state.prime(optimizer)
        sharded["optimizer"] = optimizer_state.sharded_state(optimizer, model_sd, is_loading=True)

    restore_rng = False
    if load_rng and meta.get("has_rng", True):
        saved_layout, now = meta["layout"], current_layout()
        if same_layout(saved_layout, now):
            restore_rng = True
            sharded[RNG_KEY] = rng_sharded_object(None)
        elif dist.get_rank() == 0:
            logger.warning(
                "checkpoint %s was saved with TP=%d PP=%d DP=%d, this run has TP=%d PP=%d DP=%d: "
                "RNG states are not restored", path, saved_layout["tp"], saved_layout["pp"],
                saved_layout["dp"], now["tp"], now["pp"], now["dp"])

    strategy = megatron_io.load_strategy(
        path, parallel_state.get_data_parallel_group(with_context_parallel=True))
    try:
        # A converted checkpoint (tools/checkpoint/convert.py) holds weights only, without the
        # layers' _extra_state objects (FP8 metadata under Transformer Engine, empty otherwise):
        # those may be absent; any other requested key that is absent is an error.
        loaded, _, absent = megatron_io.load(sharded, path, strategy, strict=StrictHandling.RETURN_UNEXPECTED)
    except megatron_io.LOAD_ERRORS as exc:  # turned into one line naming the path
        raise CheckpointError(f"cannot load checkpoint {path} ({describe(exc)}); {hint}") from exc
    absent = sorted(k for k in absent if not k.endswith("_extra_state"))
    if absent:
        raise CheckpointError(f"checkpoint {path} lacks {len(absent)} entries this run needs, e.g. "
                              f"{', '.join(absent[:3])}; {hint}")

    _load_module(pm.model, loaded["model"], path, "model")
    for name in restore_extra:
        _load_module(extra_models[name], _unprefix(loaded[name], f"{name}."), path, name)
    if restore_optim:
        optimizer_state.load_state(optimizer, loaded["optimizer"])
    elif optimizer is not None and hasattr(optimizer, "reload_model_params"):
        # mixed precision: main (fp32) params start from the loaded model params
        optimizer.reload_model_params()
    # the schedule belongs with the optimizer state: a fresh optimizer (load_optim=False, as
    # --finetune and --no-load-optim ask) starts the run's own schedule from its beginning
    if load_optim and scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    if restore_rng:
        set_rng_state(loaded[RNG_KEY])
    dist.barrier()
    if dist.get_rank() == 0:
        logger.info("loaded checkpoint %s (iteration %d)", path, iteration)
    return LoadedCheckpoint(iteration=iteration, state=meta["state"], args=meta["args"], path=path,
                            optimizer_loaded=restore_optim, rng_loaded=restore_rng,
                            saved_layout=dict(meta["layout"]), extra_models=restore_extra)


def _optimizer_matches(meta: Dict[str, Any], optimizer, path: str) -> bool:
    """Whether the checkpoint's optimizer state can restore ``optimizer``: False (with a
    warning) when it holds none; a one-line error when it is the other kind."""
    saved = meta.get("optimizer")
    if saved is None:
        logger.warning("checkpoint %s holds no optimizer state; the optimizer starts fresh", path)
        return False
    wanted = optimizer_state.optimizer_metadata(optimizer)
    if saved["kind"] != wanted["kind"]:
        # the common part differs: param groups of the inner optimizer vs of the shards
        raise CheckpointError(
            f"checkpoint {path} holds a {saved['kind']} optimizer but this run uses a "
            f"{wanted['kind']} one; load without the optimizer state (load_optim=False)")
    if saved.get("distrib_optim_sharding_type", optimizer_state.SHARDING_TYPE) != optimizer_state.SHARDING_TYPE:
        raise CheckpointError(
            f"checkpoint {path} holds distributed-optimizer state of megatron-core's "
            f"{saved['distrib_optim_sharding_type']!r} kind, not {optimizer_state.SHARDING_TYPE!r}; "
            "load without the optimizer state (load_optim=False)")
    return True


def _unprefix(state_dict: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def _load_module(module, state_dict, path: str, what: str) -> None:
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the {what}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
