"""Conversion between checkpoint formats: a loader (source) feeds a saver (target) one tensor
at a time, in Hugging Face names and layouts (see tensor_map.py).

Formats are plug-ins: ``LOADERS[name](options)`` opens a source (``.arch``, ``.dtype``,
``.assets``, ``.get(hf_name)``); ``SAVERS[name](loader, options)`` writes the target.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from megatron_looprpt.arguments import dataflow_changes
from megatron_looprpt.conversion.architecture import ConversionError
from megatron_looprpt.conversion.hf_format import HFLoader, asset_files, parse_size, save_hf
from megatron_looprpt.conversion.mcore_format import McoreLoader, save_mcore
from megatron_looprpt.training.checkpointing import resolve_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ConvertOptions:
    source_format: str
    target_format: str
    load_dir: str
    save_dir: str
    target_tensor_parallel_size: Optional[int] = None
    target_pipeline_model_parallel_size: Optional[int] = None
    dtype: Optional[str] = None            # None: keep the source's
    vocab_size: Optional[int] = None       # mcore source: the true vocabulary, if not derivable
    make_vocab_size_divisible_by: Optional[int] = None   # None: a megatron source's, else 128
    max_shard_size: str = "2GB"
    source_model: str = "student"          # mcore source: or LoopRPT's EMA "teacher"
    hf_assets: Optional[str] = None        # extra files for an HF target (Ouro's remote code, ...)


def _open_hf(o: ConvertOptions):
    return HFLoader(o.load_dir)


def _open_mcore(o: ConvertOptions):
    return McoreLoader(o.load_dir, vocab_size=o.vocab_size, model=o.source_model)


def _target_dtype(loader, o: ConvertOptions) -> torch.dtype:
    return DTYPES[o.dtype] if o.dtype else loader.dtype


def _assets(loader, o: ConvertOptions) -> Dict[str, str]:
    assets = dict(loader.assets)
    if o.hf_assets:
        assets.update({n: os.path.join(o.hf_assets, n) for n in asset_files(o.hf_assets)})
    return assets


def _save_hf(loader, o: ConvertOptions) -> str:
    # Ouro's tensors hold such weights, but Ouro's modeling code would run them as another
    # function; resharding them (--target-format mcore) keeps their loop setting
    changes = dataflow_changes(getattr(loader, "args", None) or {})
    if changes:
        flag, what = changes[0]
        raise ConversionError(f"--load-dir {o.load_dir}: trained with {flag}, which {what}; Ouro's "
                              f"architecture does not, so only checkpoints without {flag} export to "
                              "Hugging Face (--target-format mcore reshards it)")
    save_hf(loader.arch, loader.get, _target_dtype(loader, o), o.save_dir, parse_size(o.max_shard_size),
            _assets(loader, o))
    return o.save_dir


def _save_mcore(loader, o: ConvertOptions) -> str:
    source_args = getattr(loader, "args", None)     # a megatron source: its run arguments
    divisible_by = o.make_vocab_size_divisible_by or (source_args or {}).get("make_vocab_size_divisible_by") or 128
    return save_mcore(loader.arch, loader.get, _target_dtype(loader, o), o.save_dir,
                      o.target_tensor_parallel_size or 1, o.target_pipeline_model_parallel_size or 1,
                      divisible_by, _assets(loader, o), source_args)


LOADERS: Dict[str, Callable] = {"hf": _open_hf, "mcore": _open_mcore}
SAVERS: Dict[str, Callable] = {"hf": _save_hf, "mcore": _save_mcore}


def check_options(o: ConvertOptions) -> None:
    """Everything that can be refused before a tensor is read; one-line errors naming the flag."""
    for flag, value, table in (("--source-format", o.source_format, LOADERS),
                               ("--target-format", o.target_format, SAVERS)):
        if value not in table:
            raise ConversionError(f"{flag} {value!r}: choose one of {', '.join(sorted(table))}")
    if o.dtype is not None and o.dtype not in DTYPES:
        raise ConversionError(f"--dtype {o.dtype!r}: choose one of {', '.join(DTYPES)}")
    if o.target_format != "mcore" and (o.target_tensor_parallel_size or o.target_pipeline_model_parallel_size):
        raise ConversionError("--target-tensor-parallel-size / --target-pipeline-model-parallel-size "
                              "apply to --target-format mcore only")
    if o.source_format != "mcore" and (o.vocab_size is not None or o.source_model != "student"):
        raise ConversionError("--vocab-size and --source-model apply to --source-format mcore only")
    if o.make_vocab_size_divisible_by is not None and o.make_vocab_size_divisible_by < 1:
        raise ConversionError(f"--make-vocab-size-divisible-by must be >= 1, got {o.make_vocab_size_divisible_by}")
    if not os.path.isdir(o.load_dir):
        raise ConversionError(f"--load-dir {o.load_dir} is not a directory")
    if os.path.abspath(o.load_dir) == os.path.abspath(o.save_dir):
        raise ConversionError("--save-dir must differ from --load-dir")
    if o.target_format == "hf":
        parse_size(o.max_shard_size)
        if os.path.exists(o.save_dir) and os.listdir(o.save_dir):
            raise ConversionError(f"--save-dir {o.save_dir} exists and is not empty (choose a new directory)")
    elif resolve_checkpoint(o.save_dir) is not None:
        raise ConversionError(f"--save-dir {o.save_dir} already holds a checkpoint (choose a new directory)")
    if o.hf_assets is not None and not os.path.isdir(o.hf_assets):
        raise ConversionError(f"--hf-assets {o.hf_assets} is not a directory")


def convert(o: ConvertOptions) -> str:
    """Run one conversion; returns what was written (a directory)."""
    from megatron_looprpt import parallel

    check_options(o)
    if o.target_format == "hf" and os.path.isdir(o.save_dir):
        os.rmdir(o.save_dir)  # empty (checked): save_hf renames its finished temp dir into place
    # dist_checkpointing reads and writes through a process group: a one-process one, unless
    # the caller (a test, a notebook) already runs one
    owns_group = "mcore" in (o.source_format, o.target_format) and not torch.distributed.is_initialized()
    if owns_group:
        parallel.initialize(1, 1, seed=0)
    try:
        loader = LOADERS[o.source_format](o)
        return SAVERS[o.target_format](loader, o)
    finally:
        if owns_group:
            parallel.destroy()


__all__ = ["ConvertOptions", "ConversionError", "LOADERS", "SAVERS", "check_options", "convert"]
