"""A finished run's checkpoint read back for reuse (evaluation, generation): its saved
arguments, and the checks made before any model is built, as one-line errors naming the flag."""

from __future__ import annotations

import os
from typing import Any, Dict

from megatron_looprpt.arguments import ConfigError
from megatron_looprpt.flags import build_parser
from megatron_looprpt.training import checkpointing


def read_saved_run(flag: str, load_dir: str) -> Dict[str, Any]:
    """``checkpointing.read_checkpoint_info`` of ``load_dir``, which must hold a checkpoint that
    saved its run arguments (the model shape is read from them)."""
    if not load_dir or not os.path.isdir(load_dir):
        raise ConfigError(f"{flag} {load_dir} does not exist or is not a directory")
    try:
        info = checkpointing.read_checkpoint_info(load_dir)
    except checkpointing.CheckpointError as error:
        raise ConfigError(f"{flag} {load_dir}: {error}") from None
    if info is None:
        raise ConfigError(f"{flag} {load_dir}: no checkpoint there (neither "
                          f"{checkpointing.TRACKER_FILENAME} nor a complete iter_* directory)")
    if not info.get("args"):
        raise ConfigError(f"{flag} {load_dir}: the checkpoint saved no run arguments, so its model "
                          "shape is unknown")
    return info


def saved_model_args(saved: Dict[str, Any]) -> Dict[str, Any]:
    """The saved arguments, for running the model rather than continuing its run: over today's
    defaults (flags added after the checkpoint was written), with no training objective, whose
    checks (a GRPO run's batch split into groups, its prompt file) do not bind a reader."""
    args = vars(build_parser().parse_args([]))
    args.update(saved)
    args.update(rl_algo="none")
    return args


def check_vocab_padding(flag: str, path: str, saved: Dict[str, Any], padded_vocab_size: int,
                        tensor_parallel: int) -> None:
    """Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by x TP: a TP size
    that pads it otherwise cannot load the checkpoint's embedding and output layer."""
    saved_padded = saved.get("padded_vocab_size")
    if saved_padded is not None and saved_padded != padded_vocab_size:
        raise ConfigError(f"{flag} {path}: --tensor-model-parallel-size {tensor_parallel} pads the "
                          f"vocabulary to {padded_vocab_size}, the checkpoint has {saved_padded}: choose "
                          "a TP size that pads it alike (or re-pad it with tools/checkpoint/convert.py)")
