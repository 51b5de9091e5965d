"""EMA teacher for LoopRPT: teacher <- decay * teacher + (1 - decay) * student after each
optimizer step, starting from teacher = student.

Teacher and student are sharded identically (same TP/PP/DP layout), so each rank updates its own
shards and nothing is communicated.
"""

from __future__ import annotations

from typing import Iterable, List

import torch


def _paired(dst: Iterable[torch.Tensor], src: Iterable[torch.Tensor]):
    dst_list: List[torch.Tensor] = list(dst)
    src_list: List[torch.Tensor] = list(src)
    if len(dst_list) != len(src_list):
        raise ValueError(f"parameter count mismatch: {len(dst_list)} vs {len(src_list)}")
    return dst_list, src_list


@torch.no_grad()
def ema_update_(teacher_params: Iterable[torch.Tensor], student_params: Iterable[torch.Tensor],
                decay: float) -> None:
    """In place: teacher = decay * teacher + (1 - decay) * student."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    teacher, student = _paired(teacher_params, student_params)
    if teacher:
        # lerp(t, s, w) = t + w * (s - t): one fused multi-tensor kernel per dtype/device group.
        torch._foreach_lerp_(teacher, student, 1.0 - decay)


@torch.no_grad()
def copy_params_(dst: Iterable[torch.Tensor], src: Iterable[torch.Tensor]) -> None:
    """In place: dst = src (e.g. teacher = student at the start of training)."""
    dst_list, src_list = _paired(dst, src)
    if dst_list:
        torch._foreach_copy_(dst_list, src_list)
