"""LoopRPT loss (arXiv 2603.19714): reinforcement pre-training on the latent loop steps.

Per micro-batch, with tensors shaped [T, b, s] (loop steps first) unless noted:

1. The EMA teacher's exit distribution gives a reference step t_ref (first step whose exit CDF
   reaches ``reference_threshold``), a baseline b = teacher log-prob of the gold token at t_ref
   and a difficulty d = H_teacher(t_ref) / log V in [0, 1].
2. Hard tokens: per sequence, the valid positions of highest teacher last-step entropy, a
   ``hard_token_ratio`` of them, ranked in a way every parallel layout reproduces (see
   ``hard_token_mask``). Every term below is summed over hard tokens only.
3. Step reward r_t = ((s_logp_t - b) - lam * (t - t_ref)) * reward_scale with
   lam = time_penalty * (1 + time_penalty_scale * (1 - d)): a step earns what it gains over the
   teacher's reference and pays for every step past t_ref (and is credited for steps before it).
4. Noisy latent rollouts: each of G rollouts samples an exit step from its own exit distribution;
   its reward is r at that step; GRPO advantages over G drive log pi_g(step) (policy loss summed
   over g, or averaged with ``pg_rollout_reduction="mean"``).
5. Backbone loss sum_t p(t) * CE_t * (1 + relu(Ahat_t)) with Ahat_t the reward normalised over
   the T steps, an entropy bonus on the student's exit distribution and a k3 KL to the teacher on
   the gold token weighted by p(t).

b and t_ref are the same for all of a token's steps and rollouts, so they cancel from both
normalised advantages: the teacher reaches the gradients only through d (which sets lam) and the
KL. Steps are 0-based inside (t = 0..T-1); reported step metrics are 1-based.

docs/looprpt.md lists every difference from the authors' trainer, with its reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

# The exit distribution and the q-exit rule are the model's own, so the loss and the model's
# inference-time exit can never disagree.
from megatron_looprpt.models.exit_gate import (exit_distribution, exit_log_distribution,
                                               expected_exit_step)
from megatron_looprpt.models.exit_gate import q_exit_steps as reference_step

__all__ = [
    "LoopRPTConfig", "TeacherOutputs", "StudentOutputs", "exit_distribution",
    "exit_log_distribution", "exit_entropy", "reference_step", "difficulty", "hard_token_count",
    "hard_token_mask", "step_rewards", "sample_exit_steps", "deviations_from_mean", "grpo_advantages",
    "k3_kl", "looprpt_loss",
]


@dataclass(frozen=True)
class LoopRPTConfig:
    """Defaults follow the authors' released configuration (docs/looprpt.md)."""

    reference_threshold: float = 0.5  # CDF level of the teacher's exit distribution that is t_ref
    exit_threshold: float = 0.9       # Q-exit's, for the reported Q-exit steps only
    hard_token_ratio: float = 0.2     # fraction of valid tokens per sequence trained on
    num_rollouts: int = 8             # G noisy latent rollouts
    pg_rollout_reduction: str = "sum"  # over the G rollouts: "sum" or "mean"
    reward_scale: float = 1.0
    time_penalty: float = 0.02        # lam_base
    time_penalty_scale: float = 0.5   # lam_scale: easy tokens pay up to (1 + scale) x lam_base
    pg_coef: float = 1.0
    model_coef: float = 1.0
    entropy_coef: float = 0.01
    kl_coef: float = 0.001
    kl_clamp: float = 10.0            # upper clamp on the per-step k3 term, as the authors do
    eps: float = 1e-8                 # in the advantage normalisations

    def __post_init__(self):
        for name in ("reference_threshold", "exit_threshold"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.pg_rollout_reduction not in ("sum", "mean"):
            raise ValueError(f"pg_rollout_reduction must be sum or mean, got {self.pg_rollout_reduction!r}")
        if not 0.0 < self.hard_token_ratio <= 1.0:
            raise ValueError(f"hard_token_ratio must be in (0, 1], got {self.hard_token_ratio}")
        if self.num_rollouts < 2:
            raise ValueError("GRPO needs num_rollouts >= 2 to normalise over the group")
        if self.eps <= 0.0:
            raise ValueError("eps must be positive")


@dataclass
class TeacherOutputs:
    logp: torch.Tensor          # [T, b, s] log-prob of the gold token at each step
    gate_logits: torch.Tensor   # [T, b, s]
    entropy: torch.Tensor       # [T, b, s] entropy of the full next-token distribution


@dataclass
class StudentOutputs:
    logp: torch.Tensor                 # [T, b, s], with grad
    gate_logits: torch.Tensor          # [T, b, s], with grad
    rollout_gate_logits: torch.Tensor  # [G, T, b, s], gates on noisy latents, with grad


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32: the reductions over steps and tokens are not safe in bf16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def exit_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) over the step dimension 0. Clamping inside the log keeps the gradient finite where a
    probability underflows to zero (0 * log 0 would give NaN gradients)."""
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(dim=0)


def difficulty(entropy_at_ref: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Teacher entropy normalised by its maximum log V, clamped to [0, 1]."""
    return (entropy_at_ref / math.log(vocab_size)).clamp(0.0, 1.0)


# Width of the entropy levels that hard tokens are ranked by, in nats (docs/looprpt.md, "Hard
# tokens"): wider than the spread of an untrained model's entropies within a sequence, so that
# such a sequence is one level on every layout, and narrow enough that within a trained one only
# tokens this close to the cut are ordered by position rather than by entropy.
ENTROPY_LEVEL = 2.0 ** -6
_MAX_LEVEL = 2 ** 20          # keeps level * 2**32 + scramble inside int64
# Knuth's multiplicative hash: an odd multiplier permutes positions modulo 2**32.
_SCRAMBLE = 2654435761


def hard_token_count(num_valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """Hard tokens of a sequence with ``num_valid`` valid ones: as many as lie at or above the
    linearly interpolated (1 - ratio) quantile of distinct values, n - ceil((1 - ratio)(n - 1)),
    at least one whenever n >= 1. The tolerance keeps a product that is a whole number in exact
    arithmetic from rounding up past it."""
    n = num_valid.to(torch.float64)
    return (n - torch.ceil((1.0 - ratio) * (n - 1.0) - 1e-9)).clamp_min(0.0).to(torch.long)


def hard_token_mask(last_step_entropy: torch.Tensor, loss_mask: torch.Tensor,
                    ratio: float) -> torch.Tensor:
    """[b, s] bool: per sequence, the ``hard_token_count`` valid positions of highest entropy.

    Entropies are compared in levels of ENTROPY_LEVEL below the sequence's largest one, and
    positions of one level in a fixed scrambled order of their index. A layout whose entropies
    differ from another's by round-off then picks the same tokens unless a token lies within
    that round-off of a level edge; in particular an untrained model's sequence, whose
    entropies all lie within one level of its largest, is ordered by position alone.
    """
    valid = loss_mask.bool()
    entropy = last_step_entropy.detach().double()
    row_max = entropy.masked_fill(~valid, float("-inf")).amax(dim=-1, keepdim=True)
    level = torch.floor((row_max - entropy) / ENTROPY_LEVEL).clamp(0, _MAX_LEVEL).to(torch.long)
    positions = torch.arange(entropy.shape[-1], device=entropy.device, dtype=torch.long)
    key = level * 2 ** 32 + (positions * _SCRAMBLE) % 2 ** 32
    key = key.masked_fill(~valid, torch.iinfo(torch.long).max)
    rank = torch.argsort(torch.argsort(key, dim=-1), dim=-1)
    return valid & (rank < hard_token_count(valid.sum(dim=-1, keepdim=True), ratio))


def step_rewards(s_logp_detached: torch.Tensor, baseline: torch.Tensor, t_ref: torch.Tensor,
                 difficulty: torch.Tensor, cfg: LoopRPTConfig) -> torch.Tensor:
    """[T, b, s] reward of exiting at each step (see the module docstring, step 3)."""
    num_steps = s_logp_detached.shape[0]
    steps = torch.arange(num_steps, device=s_logp_detached.device).view(-1, *([1] * t_ref.dim()))
    lam = cfg.time_penalty * (1.0 + cfg.time_penalty_scale * (1.0 - difficulty))
    gain = s_logp_detached.detach() - baseline
    return (gain - lam * (steps - t_ref).to(gain.dtype)) * cfg.reward_scale


def sample_exit_steps(rollout_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[G, T, b, s] exit distributions -> [G, b, s] sampled 0-based steps (long).

    Inverse-CDF sampling with the caller's uniforms [G, b, s]: the caller draws them per
    sequence from a generator keyed by the global sample index, so a sample does not depend on
    how sequences are grouped into micro-batches or ranks. The CDF is accumulated in fp64 and
    the index clamped to T - 1 in case rounding leaves it a hair below 1.
    """
    num_steps = rollout_p.shape[1]
    cdf = torch.cumsum(rollout_p.detach().double(), dim=1)
    u = uniforms.to(device=cdf.device, dtype=torch.float64).unsqueeze(1)
    # First t with u < cdf_t: steps with p = 0 add an empty interval and are never picked.
    return (cdf <= u).sum(dim=1).clamp_max(num_steps - 1)


def deviations_from_mean(rewards: torch.Tensor, dim: int) -> torch.Tensor:
    """rewards - their mean along ``dim``, exactly zero where a group's rewards are all equal.

    The mean of eight equal fp32 numbers is often one ulp away from them (7e-9 for a reward of
    0.1), and with the group's std exactly zero, LoopRPT's eps of 1e-8 scales that ulp into an
    advantage of order one: a gradient made of round-off, different under each parallel layout.
    Deviations from the group's first member are exact zeros for such a group, and so is their
    mean; otherwise they equal r - mean(r) to round-off.
    """
    shifted = rewards - rewards.narrow(dim, 0, 1)
    return shifted - shifted.mean(dim=dim, keepdim=True)


def grpo_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """(R - mean R) / (std R + eps) over dimension 0 (unbiased std, as the authors).

    Used over the G rollouts (GRPO) and, for the backbone weights, over the T steps.
    """
    if rewards.shape[0] < 2:
        raise ValueError("advantages need a group of at least two along dimension 0")
    return deviations_from_mean(rewards, 0) / (rewards.std(dim=0, keepdim=True) + eps)


def k3_kl(t_logp: torch.Tensor, s_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(student || teacher) on the sampled (gold) token:
    exp(delta) - delta - 1 with delta = t_logp - s_logp; >= 0 and zero iff they agree."""
    delta = t_logp - s_logp
    return torch.expm1(delta) - delta


def looprpt_loss(teacher: TeacherOutputs, student: StudentOutputs, loss_mask: torch.Tensor,
                 vocab_size: int, cfg: LoopRPTConfig, uniforms: torch.Tensor,
                 normalizer: Optional[Union[float, torch.Tensor]] = None,
                 ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """LoopRPT loss of one micro-batch: (sum over hard tokens of the token loss) / normalizer.

    ``normalizer`` defaults to the local number of hard tokens (at least 1); a caller that
    averages over several micro-batches or ranks passes the global hard-token count (or 1 to get
    the plain sum). The per-term metrics (pg_loss, model_loss, kl_loss, entropy, reward_mean) are
    divided by the same normalizer, so loss == pg_coef * pg_loss + model_coef * model_loss
    - entropy_coef * entropy + kl_coef * kl_loss. student_exit_step and teacher_t_ref are local
    means over valid tokens (1-based); num_hard_tokens and num_valid_tokens let the caller weight.
    """
    num_rollouts = student.rollout_gate_logits.shape[0]
    if num_rollouts != cfg.num_rollouts:
        raise ValueError(f"got {num_rollouts} rollouts, config says {cfg.num_rollouts}")

    # Teacher side: a fixed reference, never differentiated.
    t_logp = _f32(teacher.logp.detach())
    t_exit = exit_distribution(_f32(teacher.gate_logits.detach()))
    t_ref = reference_step(t_exit, cfg.reference_threshold)                        # [b, s]
    baseline = t_logp.gather(0, t_ref.unsqueeze(0)).squeeze(0)
    entropy_at_ref = _f32(teacher.entropy.detach()).gather(0, t_ref.unsqueeze(0)).squeeze(0)
    d = difficulty(entropy_at_ref, vocab_size)

    valid = loss_mask.bool()
    hard = hard_token_mask(teacher.entropy[-1], loss_mask, cfg.hard_token_ratio)
    hard_w = hard.to(t_logp.dtype)
    num_hard = hard_w.sum()
    if normalizer is None:
        normalizer = num_hard.clamp_min(1.0)

    s_logp = _f32(student.logp)
    rewards = step_rewards(s_logp.detach(), baseline, t_ref, d, cfg)               # [T, b, s]

    # Noisy latent rollouts -> policy gradient through their gates (and latents, unless gate-only).
    rollout_log_p = exit_log_distribution(_f32(student.rollout_gate_logits).transpose(0, 1))
    rollout_log_p = rollout_log_p.transpose(0, 1)                                  # [G, T, b, s]
    sampled = sample_exit_steps(rollout_log_p.detach().exp(), uniforms)            # [G, b, s]
    log_pi = rollout_log_p.gather(1, sampled.unsqueeze(1)).squeeze(1)              # [G, b, s]
    rollout_rewards = rewards.gather(0, sampled)                                   # [G, b, s]
    advantages = grpo_advantages(rollout_rewards, cfg.eps)
    pg_tok = -(advantages.detach() * log_pi).sum(dim=0)
    if cfg.pg_rollout_reduction == "mean":
        pg_tok = pg_tok / num_rollouts

    # Backbone: exit-weighted CE, up-weighted at steps whose reward beats the other steps'.
    s_exit = exit_distribution(_f32(student.gate_logits))                         # [T, b, s]
    step_adv = grpo_advantages(rewards, cfg.eps).detach()
    p_w = s_exit.detach()
    model_tok = (p_w * (-s_logp) * (1.0 + torch.relu(step_adv))).sum(dim=0)
    entropy_tok = exit_entropy(s_exit)
    kl_tok = (p_w * k3_kl(t_logp, s_logp).clamp_max(cfg.kl_clamp)).sum(dim=0)

    def hard_sum(x: torch.Tensor) -> torch.Tensor:
        return (x * hard_w).sum() / normalizer

    pg_loss, model_loss = hard_sum(pg_tok), hard_sum(model_tok)
    entropy, kl_loss = hard_sum(entropy_tok), hard_sum(kl_tok)
    loss = (cfg.pg_coef * pg_loss + cfg.model_coef * model_loss
            - cfg.entropy_coef * entropy + cfg.kl_coef * kl_loss)

    with torch.no_grad():
        valid_w = valid.to(t_logp.dtype)
        num_valid = valid_w.sum()
        per_valid = num_valid.clamp_min(1.0)
        metrics = {
            "reward_mean": hard_sum(rollout_rewards.mean(dim=0)),
            "pg_loss": pg_loss.detach(),
            "model_loss": model_loss.detach(),
            "kl_loss": kl_loss.detach(),
            "entropy": entropy.detach(),
            "student_exit_step": (expected_exit_step(s_exit) * valid_w).sum() / per_valid,
            "teacher_t_ref": ((t_ref + 1).to(valid_w.dtype) * valid_w).sum() / per_valid,
            "hard_token_fraction": num_hard / per_valid,
            "num_hard_tokens": num_hard,
            "num_valid_tokens": num_valid,
        }
    return loss, metrics
