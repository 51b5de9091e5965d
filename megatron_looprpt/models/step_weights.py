"""Fixed weights over the T loop steps, shared by stage 1's backbone loss and RLTT.

Plain Python (no torch), so that argument validation can check them before any heavy import.
"""

from __future__ import annotations

from typing import List

NAMED_STEP_WEIGHTS = ("last", "uniform", "progressive")
LAST_SHARE = "last:"


def _last_share(kind: str, loop_steps: int) -> List[float]:
    try:
        share = float(kind[len(LAST_SHARE):])
    except ValueError:
        share = -1.0
    if not 0.0 < share <= 1.0:
        raise ValueError(f"step weights {kind!r}: the last step's share must be a number in (0, 1], e.g. last:0.7")
    if loop_steps == 1:
        return [1.0]
    return [(1.0 - share) / (loop_steps - 1)] * (loop_steps - 1) + [share]


def step_weights(kind: str, loop_steps: int) -> List[float]:
    """w_t over the T loop steps, normalised to sum to 1: "last", "uniform", "progressive"
    (w_t proportional to t), "last:F" (the last step F, the others (1 - F) / (T - 1) each) or
    explicit comma-separated weights, one per step."""
    if kind == "last":
        weights = [0.0] * (loop_steps - 1) + [1.0]
    elif kind.startswith(LAST_SHARE):
        weights = _last_share(kind, loop_steps)
    elif kind == "uniform":
        weights = [1.0] * loop_steps
    elif kind == "progressive":
        weights = [float(t) for t in range(1, loop_steps + 1)]
    else:
        try:
            weights = [float(w) for w in kind.split(",")]
        except ValueError:
            raise ValueError(f"step weights {kind!r}: choose one of {', '.join(NAMED_STEP_WEIGHTS)}, "
                             "last:F or comma-separated numbers") from None
        if len(weights) != loop_steps or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"step weights {kind!r}: give {loop_steps} non-negative numbers, not all zero")
    total = sum(weights)
    return [w / total for w in weights]
