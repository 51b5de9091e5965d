"""The one decision where this process computes: a CUDA device or the CPU.

Everything that places tensors, picks kernels or reads device properties asks here, never
``torch.cuda.is_available()`` directly: a GPU host told ``LOOPRPT_FORCE_CPU=1`` must run the
CPU path everywhere (gloo, the CPU bridge, unfused kernels, CPU tensors), not a mix of both.
"""

from __future__ import annotations

import copy
import os
from typing import Dict

import torch


def use_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("LOOPRPT_FORCE_CPU", "0") != "1"


def compute_device() -> torch.device:
    """This rank's device: its current CUDA device (set from LOCAL_RANK by parallel.initialize)
    or the CPU."""
    if use_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A micro-batch on the compute device. Tensors already there pass through untouched, so a
    batch is copied once however many loop chunks read it."""
    device = compute_device()
    moved = copy.copy(batch)   # a dict subclass keeps its type and attributes (rl's PlannedBatch)
    moved.update({name: value if _resident(value, device) else _copy(value, device)
                  for name, value in batch.items()})
    return moved


def _resident(value: torch.Tensor, device: torch.device) -> bool:
    return value.device == device


def _copy(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    # non_blocking: from pinned host memory the copy overlaps whatever the host does next
    return value.to(device, non_blocking=True)
