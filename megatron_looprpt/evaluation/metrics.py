"""Evaluation metrics of a looped LM as pure tensor functions.

Per-token quantities are turned into SUMS and COUNTS (``token_sums``) so that micro-batches,
data-parallel ranks and global batches combine by addition, exactly, whatever the layout; the
ratios are formed once, from the reduced totals (``summarize``).

Shapes: per-step tensors are [T, b, s] (loop step first, as ``LoopedOutput.stack`` gives them);
labels, the loss mask and the reference entropy are [b, s].

Difficulty buckets come from a reference model's next-token entropy H (nats):
easy: H < t1, medium: t1 <= H < t2, hard: t2 <= H. The thresholds are given in nats or are
quantiles of H over the evaluated tokens (``entropy_quantiles``).

Q-exit (Ouro): a token leaves the loop at the first step whose exit CDF reaches q (the last
step if none does, and always for q >= 1) and is predicted with that step's output; it has then
used (step + 1) loop steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron_looprpt.models.exit_gate import exit_distribution, expected_exit_step, q_exit_steps

BUCKETS = ("easy", "medium", "hard")
DEFAULT_EXIT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# e^1 ~ 3 and e^3 ~ 20 equally likely next tokens: "a few choices" vs "many".
DEFAULT_DIFFICULTY_THRESHOLDS = (1.0, 3.0)


@dataclass(frozen=True)
class MetricSpec:
    """What ``token_sums`` measures besides the per-step numbers."""

    exit_thresholds: Tuple[float, ...] = DEFAULT_EXIT_THRESHOLDS
    # The q whose exit steps are also broken down by difficulty (the model's --exit-threshold).
    default_threshold: float = 0.9
    difficulty_thresholds: Tuple[float, float] = DEFAULT_DIFFICULTY_THRESHOLDS


# ---------------------------------------------------------------------------------------------
# per-token building blocks


def step_correct(predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1.0 where step t's prediction is the label: [T, b, s]."""
    return (predictions == labels.unsqueeze(0)).float()


def masked_step_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of [T, b, s] values over the masked positions, per step: [T]."""
    return (values.float() * mask.float().unsqueeze(0)).sum(dim=(1, 2))


def difficulty_buckets(entropy: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """Bucket index per position (0 easy, 1 medium, 2 hard) from the reference entropy."""
    boundaries = torch.tensor(list(thresholds), dtype=entropy.dtype, device=entropy.device)
    # right=True: boundaries[i-1] <= H < boundaries[i], so a value equal to t1 is medium.
    return torch.bucketize(entropy.contiguous(), boundaries, right=True)


def entropy_quantiles(values: torch.Tensor, quantiles: Sequence[float]) -> Tuple[float, ...]:
    """Quantiles of a tensor's values, interpolated linearly between order statistics as
    ``torch.quantile`` does; by sorting, since ``torch.quantile`` refuses more than 2^24 values
    (a few global batches of long sequences)."""
    ordered = torch.sort(values.double().reshape(-1)).values
    if ordered.numel() == 0:
        raise ValueError("no tokens to take entropy quantiles of")
    result = []
    for q in quantiles:
        position = q * (ordered.numel() - 1)
        low = math.floor(position)
        high = min(low + 1, ordered.numel() - 1)
        result.append((ordered[low] + (position - low) * (ordered[high] - ordered[low])).item())
    return tuple(result)


def bucket_masks(buckets: torch.Tensor, mask: torch.Tensor, num_buckets: int = len(BUCKETS)) -> torch.Tensor:
    """One loss mask per bucket: [B, b, s]; they partition ``mask``."""
    ids = torch.arange(num_buckets, device=buckets.device).view(-1, 1, 1)
    return (buckets.unsqueeze(0) == ids).float() * mask.float().unsqueeze(0)


def q_exit_sweep(exit_probs: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """0-based exit step per token for each threshold: [Q, b, s]."""
    return torch.stack([q_exit_steps(exit_probs, q) for q in thresholds], dim=0)


def at_exit_step(per_step: torch.Tensor, exit_steps: torch.Tensor) -> torch.Tensor:
    """The value of each token's exit step: [T, b, s] values, [Q, b, s] steps -> [Q, b, s]."""
    return torch.gather(per_step, 0, exit_steps)


# ---------------------------------------------------------------------------------------------
# sums of one micro-batch


def token_sums(
    labels: torch.Tensor,
    mask: torch.Tensor,
    label_logprobs: torch.Tensor,
    predictions: torch.Tensor,
    entropy: torch.Tensor,
    gate_logits: torch.Tensor,
    reference_entropy: torch.Tensor,
    spec: MetricSpec,
) -> Dict[str, torch.Tensor]:
    """All evaluation sums of one micro-batch, as float tensors (counts are exact in fp32 up to
    2^24 tokens per reduction).

    ``step_*`` [T], ``bucket_*`` [B] or [B, T] (flattened by the reduction; ``summarize``
    restores the shape), ``sweep_*`` [Q] over ``spec.exit_thresholds``, ``exit_*`` [B] at
    ``spec.default_threshold``.
    """
    mask = mask.float()
    correct = step_correct(predictions, labels)
    nll = -label_logprobs.float()
    per_bucket = bucket_masks(difficulty_buckets(reference_entropy.float(), spec.difficulty_thresholds), mask)
    # float64: in fp32 the exit CDF of a saturated gate rounds up to 1.0 steps early, so a q
    # just below 1 would stop before the last step (q >= 1 always runs to it).
    exit_probs = exit_distribution(gate_logits.double())
    sweep_steps = q_exit_sweep(exit_probs, spec.exit_thresholds)
    default_steps = q_exit_steps(exit_probs, spec.default_threshold).unsqueeze(0)
    return {
        "tokens": mask.sum().reshape(1),
        "step_correct": masked_step_sums(correct, mask),
        "step_nll": masked_step_sums(nll, mask),
        "step_entropy": masked_step_sums(entropy, mask),
        "bucket_tokens": per_bucket.sum(dim=(1, 2)),
        "bucket_reference_entropy": (per_bucket * reference_entropy.float()).sum(dim=(1, 2)),
        "bucket_step_correct": torch.einsum("kbs,tbs->kt", per_bucket, correct),
        "bucket_step_nll": torch.einsum("kbs,tbs->kt", per_bucket, nll),
        "sweep_correct": masked_step_sums(at_exit_step(correct, sweep_steps), mask),
        "sweep_steps": masked_step_sums(sweep_steps + 1, mask),
        "exit_correct": (per_bucket * at_exit_step(correct, default_steps)).sum(dim=(1, 2)),
        "exit_nll": (per_bucket * at_exit_step(nll, default_steps)).sum(dim=(1, 2)),
        # the LM's loss: the expected NLL under the exit distribution
        "expected_nll": ((exit_probs.float() * nll).sum(dim=0) * mask).sum().reshape(1),
        "exit_steps": (per_bucket * (default_steps + 1)).sum(dim=(1, 2)),
        "exit_expected_step": (per_bucket * expected_exit_step(exit_probs).float()).sum(dim=(1, 2)),
    }


def add_sums(total: Optional[Dict[str, torch.Tensor]],
             sums: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Accumulate reduced sums of successive global batches in float64 (exact counts well past
    the fp32 range of a single reduction)."""
    if total is None:
        return {name: value.double().clone() for name, value in sums.items()}
    return {name: total[name] + sums[name].double() for name in total}


# ---------------------------------------------------------------------------------------------
# from totals to numbers


def pareto_frontier(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the (avg steps, accuracy) points no other point dominates, by ascending steps.

    q dominates p when q has <= steps and >= accuracy, one of them strictly; equal points do
    not dominate each other, so both stay.
    """
    def dominates(q, p):
        return q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])

    keep = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(keep, key=lambda i: (points[i][0], -points[i][1], i))


def _ratio(numerator: float, denominator: float) -> Optional[float]:
    # An empty bucket has no accuracy: null in the JSON, not NaN.
    return float(numerator) / float(denominator) if denominator > 0 else None


def _distinct_points(sweep: List[dict], per_step: List[dict]) -> List[dict]:
    """Adaptive exits compete with running every token a fixed number of steps. One candidate
    per distinct (avg steps, accuracy) point, labelled with every q (and fixed depth) reaching
    it: saturated gates give many q the same exits, and q=1 is the last fixed depth."""
    points: Dict[Tuple[float, float], dict] = {}
    for p in sweep:
        if p["accuracy"] is not None:
            points.setdefault((p["avg_steps"], p["accuracy"]), {"q": [], "fixed": []})["q"].append(p["q"])
    for s in per_step:
        if s["accuracy"] is not None:
            points.setdefault((float(s["step"]), s["accuracy"]), {"q": [], "fixed": []})["fixed"].append(s["step"])
    candidates = []
    for (steps, accuracy), by in points.items():
        labels = ([f"q={','.join(f'{q:g}' for q in by['q'])}"] if by["q"] else []) + \
                 [f"fixed {step}" for step in by["fixed"]]
        candidates.append({"label": " / ".join(labels), "q": by["q"], "avg_steps": steps, "accuracy": accuracy})
    return candidates


def summarize(totals: Mapping[str, torch.Tensor], spec: MetricSpec) -> dict:
    """Means, bucket breakdowns, the q sweep and the Pareto frontier from reduced totals."""
    t = {name: value.double().reshape(-1) for name, value in totals.items()}
    num_steps = t["step_correct"].numel()
    tokens = t["tokens"].item()
    bucket_tokens = t["bucket_tokens"].tolist()
    correct_kt = t["bucket_step_correct"].reshape(len(BUCKETS), num_steps)
    nll_kt = t["bucket_step_nll"].reshape(len(BUCKETS), num_steps)

    per_step = []
    for step in range(num_steps):
        per_step.append({
            "step": step + 1,
            "accuracy": _ratio(t["step_correct"][step], tokens),
            "nll": _ratio(t["step_nll"][step], tokens),
            "entropy": _ratio(t["step_entropy"][step], tokens),
            "by_bucket": {
                name: {"accuracy": _ratio(correct_kt[k, step], bucket_tokens[k]),
                       "nll": _ratio(nll_kt[k, step], bucket_tokens[k])}
                for k, name in enumerate(BUCKETS)
            },
        })

    buckets = {
        name: {
            "tokens": int(bucket_tokens[k]),
            "fraction": _ratio(bucket_tokens[k], tokens),
            "mean_reference_entropy": _ratio(t["bucket_reference_entropy"][k], bucket_tokens[k]),
            "avg_exit_steps": _ratio(t["exit_steps"][k], bucket_tokens[k]),
            "exit_accuracy": _ratio(t["exit_correct"][k], bucket_tokens[k]),
        }
        for k, name in enumerate(BUCKETS)
    }

    sweep = [{"q": q, "avg_steps": _ratio(t["sweep_steps"][i], tokens),
              "accuracy": _ratio(t["sweep_correct"][i], tokens)}
             for i, q in enumerate(spec.exit_thresholds)]

    candidates = _distinct_points(sweep, per_step)
    frontier = [candidates[i] for i in pareto_frontier([(c["avg_steps"], c["accuracy"]) for c in candidates])]

    lm_loss = _ratio(t["expected_nll"].sum(), tokens)
    return {
        "num_tokens": int(tokens),
        # expected NLL under the exit distribution, as training's lm_loss (and its ppl)
        "lm_loss": lm_loss,
        "ppl": None if lm_loss is None else math.exp(min(lm_loss, 50.0)),
        "buckets": buckets,
        "per_step": per_step,
        "q_exit": {
            "q": spec.default_threshold,
            "avg_steps": _ratio(t["exit_steps"].sum(), tokens),
            "accuracy": _ratio(t["exit_correct"].sum(), tokens),
            "nll": _ratio(t["exit_nll"].sum(), tokens),
            "expected_exit_step": _ratio(t["exit_expected_step"].sum(), tokens),
        },
        "q_sweep": sweep,
        "pareto_frontier": frontier,
    }
