"""The ``looprpt`` entry of a checkpoint's common state, and reading it without loading tensors."""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Dict, List, Optional

from megatron_looprpt.training.checkpointing import megatron_io
from megatron_looprpt.training.checkpointing.rng import RNG_KEY
from megatron_looprpt.training.checkpointing.files import (
    CheckpointError,
    iteration_of,
    previous_hint,
    resolve_checkpoint,
)

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
# top-level entries of the sharded state dict, ours and megatron-core's own (0.17+ add
# "common_state"), which extra models cannot be named
RESERVED = {"model", "optimizer", "scheduler", "looprpt", RNG_KEY, "common_state", "content_metadata"}


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


def _jsonable(value: Any, what: str) -> Any:
    """``value`` through JSON, so the common state loads with ``weights_only=True``. A value
    JSON cannot hold is stored as its ``str()`` (with a warning) rather than failing a save
    hours into a run."""
    def fallback(obj):
        logger.warning("checkpoint %s: %r is not JSON-serialisable, stored as a string", what, obj)
        return str(obj)

    return json.loads(json.dumps(value, default=fallback))


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe(exc: BaseException) -> str:
    """The root cause of a (possibly torch.distributed.checkpoint-wrapped) error, one line."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, wrapped = sorted(failures.items())[0]
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        if isinstance(inner, BaseException):
            return f"rank {rank}: {describe(inner)}"
    return f"{type(exc).__name__}: {one_line(exc)[:300]}"


def read_common(path: str) -> Dict[str, Any]:
    """The common state of the checkpoint directory ``path``; CheckpointError if unreadable."""
    try:
        common = megatron_io.load_common(path)
    except megatron_io.LOAD_ERRORS as exc:  # turned into one line naming the path
        why = megatron_io.unreadable_common_hint(path) or describe(exc)
        raise CheckpointError(
            f"cannot read the common state of checkpoint {path} ({why}); "
            f"{previous_hint(os.path.dirname(path), iteration_of(path))}"
        ) from exc
    if not isinstance(common, dict) or "looprpt" not in common:
        raise CheckpointError(f"{path} is not a megatron_looprpt checkpoint (no 'looprpt' entry)")
    return common


def read_checkpoint_args(load_dir: str) -> Optional[Dict[str, Any]]:
    """The ``args`` saved with the checkpoint ``load_dir`` resolves to, or None if there is none.

    Reads only the common state: no model, no process group, no megatron state.
    """
    resolved = resolve_checkpoint(load_dir)
    if resolved is None:
        return None
    return read_common(resolved[0])["looprpt"]["args"]


def read_checkpoint_info(load_dir: str) -> Optional[Dict[str, Any]]:
    """Iteration, path, layout, args and state of the checkpoint, without loading tensors."""
    resolved = resolve_checkpoint(load_dir)
    if resolved is None:
        return None
    info = dict(read_common(resolved[0])["looprpt"])
    info["path"] = resolved[0]
    return info


def check_extra_models(extra_models) -> Dict[str, Any]:
    """``extra_models`` (name -> module) as a dict; each name becomes a top-level entry."""
    extra_models = dict(extra_models or {})
    for name in extra_models:
        if name in RESERVED or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise ValueError(f"extra model name {name!r} is reserved or not an identifier")
    return extra_models
