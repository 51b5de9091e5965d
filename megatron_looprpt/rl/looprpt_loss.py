"""LoopRPT loss (arXiv 2603.19714): reinforcement pre-training on the latent loop steps.

Per micro-batch, with tensors shaped [T, b, s] (loop steps first) unless noted:

1. The EMA teacher's exit distribution gives a reference step t_ref (first step whose exit CDF
   reaches ``exit_threshold``), a baseline b = teacher log-prob of the gold token at t_ref and a
   difficulty d = H_teacher(t_ref) / log V in [0, 1].
2. Hard tokens: per sequence, the valid positions whose teacher last-step entropy is in the top
   ``hard_token_ratio``. Every term below is summed over hard tokens only.
3. Step reward r_t = ((s_logp_t - b) - lam * (t - t_ref)) * reward_scale with
   lam = time_penalty * (1 + time_penalty_scale * (1 - d)): a step earns what it gains over the
   teacher's reference and pays for every step past t_ref (and is credited for steps before it).
4. Noisy latent rollouts: each of G rollouts samples an exit step from its own exit distribution;
   its reward is r at that step; GRPO advantages over G drive log pi_g(step) (policy loss on the
   exit gate, mean over g).
5. Backbone loss sum_t p(t) * CE_t * (1 + relu(Ahat_t)) with Ahat_t the reward normalised over
   the T steps, an entropy bonus on the student's exit distribution and a k3 KL to the teacher on
   the gold token weighted by p(t).

Steps are 0-based inside (t = 0..T-1); rewards only use the difference t - t_ref, so the choice
does not change them. Reported step metrics are 1-based.

Differences from the authors' trainer (the RLPTrainer.compute_loss/calculate_gate_stats code
published with the paper), on purpose:
- log pi_g is read from the exit distribution computed in log space instead of log(p + 1e-8);
- the exit step is sampled by inverse CDF with uniforms from a caller-supplied generator (they use
  torch.multinomial), so a sample depends on the generator state and the probabilities only;
- a hard token is one whose entropy is >= the row quantile (they use >, which can select nothing
  when a row's entropies tie), so every row with valid tokens keeps at least one;
- the KL is their "backbone" variant (clean student per-step log-probs, weighted by the detached
  exit probabilities); their other variant uses the noisy rollouts' per-step log-probs, which the
  model does not hand to this loss.
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
    "exit_log_distribution", "exit_entropy", "reference_step", "difficulty", "hard_token_mask",
    "step_rewards", "sample_exit_steps", "grpo_advantages", "k3_kl", "looprpt_loss",
]


@dataclass(frozen=True)
class LoopRPTConfig:
    """Defaults follow the authors' released training configuration."""

    exit_threshold: float = 0.5       # q: CDF level that defines the teacher's reference step
    hard_token_ratio: float = 0.2     # fraction of valid tokens per sequence trained on
    num_rollouts: int = 8             # G noisy latent rollouts
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
        if not 0.0 < self.exit_threshold <= 1.0:
            raise ValueError(f"exit_threshold must be in (0, 1], got {self.exit_threshold}")
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


def hard_token_mask(last_step_entropy: torch.Tensor, loss_mask: torch.Tensor,
                    ratio: float) -> torch.Tensor:
    """[b, s] bool: valid positions with entropy >= their sequence's (1 - ratio) quantile.

    The quantile is taken over each sequence's valid positions only (invalid ones are NaN for
    nanquantile) and capped at the row maximum so that rounding in the interpolation can never
    leave a sequence with valid tokens without a hard one.
    """
    valid = loss_mask.bool()
    entropy = _f32(last_step_entropy.detach())
    threshold = torch.nanquantile(entropy.masked_fill(~valid, float("nan")), 1.0 - ratio,
                                  dim=-1, keepdim=True)
    row_max = entropy.masked_fill(~valid, float("-inf")).amax(dim=-1, keepdim=True)
    return valid & (entropy >= torch.minimum(threshold, row_max))


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


def grpo_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """(R - mean R) / (std R + eps) over dimension 0 (unbiased std, as the authors).

    Used over the G rollouts (GRPO) and, for the backbone weights, over the T steps.
    """
    if rewards.shape[0] < 2:
        raise ValueError("advantages need a group of at least two along dimension 0")
    mean = rewards.mean(dim=0, keepdim=True)
    std = rewards.std(dim=0, keepdim=True)
    return (rewards - mean) / (std + eps)


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
    t_ref = reference_step(t_exit, cfg.exit_threshold)                             # [b, s]
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

    # Noisy latent rollouts -> policy gradient on the exit gate.
    rollout_log_p = exit_log_distribution(_f32(student.rollout_gate_logits).transpose(0, 1))
    rollout_log_p = rollout_log_p.transpose(0, 1)                                  # [G, T, b, s]
    sampled = sample_exit_steps(rollout_log_p.detach().exp(), uniforms)            # [G, b, s]
    log_pi = rollout_log_p.gather(1, sampled.unsqueeze(1)).squeeze(1)              # [G, b, s]
    rollout_rewards = rewards.gather(0, sampled)                                   # [G, b, s]
    advantages = grpo_advantages(rollout_rewards, cfg.eps)
    pg_tok = -(advantages.detach() * log_pi).mean(dim=0)

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
