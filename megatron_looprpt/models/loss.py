"""Training objectives of the looped LM (Ouro), and the LM loss they are measured by.

The LM's loss is the expected cross entropy under the exit distribution, sum_t p(t) CE_t: the
loss of a model that exits at step t with probability p(t). It is what ``lm_loss`` and ``ppl``
report whatever is optimised, so runs with different objectives compare on one scale.

Stage 1 objectives (``step_weights``):
- ``exit`` (Ouro's): L = sum_t p(t) CE_t - beta H(p). The backbone's step-t loss is weighted by
  the gate's p(t); the entropy bonus (a KL to the uniform prior, up to a constant) keeps the gate
  from collapsing onto one step.
- fixed weights (``models/step_weights.py``: ``last:F``, the CLI's default, ``uniform``,
  ``progressive``, ``last`` or ``w1,...,wT``): the backbone is trained on sum_t w_t CE_t (w_T = F
  and the others (1 - F) / (T - 1); 1/T each; w_t proportional to t; CE_T alone; the given
  numbers, normalised), and the gate learns the same exit objective on the detached per-step
  losses, sum_t p(t) sg[CE_t] - beta H(p). The gate then decides where to exit without deciding
  how much each step is trained, which breaks the loop by which an early-exiting gate starves the
  later steps of gradient and the later steps' higher loss pushes the gate to exit earlier still.
- ``increase_penalty`` lambda (an ablation, not Ouro's) adds lambda * sum_t max(0, CE_{t+1} -
  sg[CE_t]) per token to either.
Stage 2 (gate training): the backbone is frozen out of the loss (its per-step losses are
detached) and the gate learns to stop when another step stops helping: with the per-token
improvement I_t = max(0, CE_{t-1} - CE_t), the target continue-probability is
w_t = sigmoid(k * (I_t - gamma)) and the gate is trained with binary cross entropy between
(1 - lambda_t) and w_t.

Everything returns per-token tensors [b, s]; reductions over tokens are the caller's
(token-weighted, so that every layout and micro-batching gives the same loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

from megatron_looprpt.models.exit_gate import exit_log_distribution, expected_exit_step, q_exit_steps
from megatron_looprpt.models.step_weights import step_weights as fixed_step_weights


@dataclass(frozen=True)
class ExitLossConfig:
    entropy_coef: float = 0.05
    stage: str = "stage1"
    step_weights: str = "exit"
    improvement_sharpness: float = 50.0   # k
    improvement_margin: float = 0.005     # gamma
    exit_threshold: float = 0.9           # q of Q-exit, for the steps-used metric
    increase_penalty: float = 0.0         # lambda of the step-increase penalty (not Ouro's)

    def __post_init__(self):
        if self.step_weights != "exit":
            # a clear error now rather than at the first step (the count of numbers is checked there)
            fixed_step_weights(self.step_weights, len(self.step_weights.split(",")))


def step_increase(ce: torch.Tensor) -> torch.Tensor:
    """[T, b, s] per-step CE -> [b, s] sum_t max(0, CE_{t+1} - sg[CE_t]): how far each token's
    later steps rise above the step before. Its gradient reaches only the step that rose, so it
    trains that step harder and never makes an earlier step worse to close the gap."""
    return torch.clamp(ce[1:] - ce[:-1].detach(), min=0.0).sum(dim=0)


def stage1_token_loss(label_logprobs: torch.Tensor, gate_logits: torch.Tensor, entropy_coef: float,
                      step_weights: str = "exit", increase_penalty: float = 0.0) -> torch.Tensor:
    """[T, b, s] inputs -> [b, s] stage-1 objective (see the module docstring)."""
    ce = -label_logprobs
    log_p = exit_log_distribution(gate_logits)
    p = log_p.exp()
    regularisers = entropy_coef * (p * log_p).sum(dim=0)     # -beta H(p)
    if increase_penalty:
        regularisers = regularisers + increase_penalty * step_increase(ce)
    if step_weights == "exit":
        return (p * ce).sum(dim=0) + regularisers
    weights = torch.tensor(fixed_step_weights(step_weights, ce.shape[0]), dtype=ce.dtype, device=ce.device)
    backbone = (ce * weights.view(-1, *[1] * (ce.dim() - 1))).sum(dim=0)
    # The gate's term, sum_t p(t) sg[CE_t], less its own value: the gradient it sends the gate
    # is unchanged, and the objective's value stays backbone CE - beta H(p) (+ the penalty).
    gate = (p * ce.detach()).sum(dim=0)
    return backbone + (gate - gate.detach()) + regularisers


def stage2_token_loss(label_logprobs: torch.Tensor, gate_logits: torch.Tensor,
                      cfg: ExitLossConfig) -> torch.Tensor:
    """[T, b, s] inputs -> [b, s] gate-only loss (gradient reaches the gate alone)."""
    ce = -label_logprobs.detach()
    improvement = torch.clamp(ce[:-1] - ce[1:], min=0.0)          # I_t for t = 1..T-1
    target_continue = torch.sigmoid(cfg.improvement_sharpness * (improvement - cfg.improvement_margin))
    # lambda_t decides whether to stop after step t; continuing is right when step t+1 helps.
    if gate_logits.shape[0] == 1:
        return gate_logits[0] * 0.0  # one step: nothing to decide
    stop_logits = gate_logits[:-1]
    bce = F.binary_cross_entropy_with_logits(-stop_logits, target_continue, reduction="none")
    return bce.mean(dim=0)


def token_loss(label_logprobs, gate_logits, cfg: ExitLossConfig) -> torch.Tensor:
    """[T, b, s] inputs -> [b, s] objective of ``cfg``'s stage."""
    if cfg.stage == "stage2":
        return stage2_token_loss(label_logprobs, gate_logits, cfg)
    return stage1_token_loss(label_logprobs, gate_logits, cfg.entropy_coef, cfg.step_weights,
                             cfg.increase_penalty)


def lm_metric_sums(label_logprobs: torch.Tensor, gate_logits: torch.Tensor, mask: torch.Tensor,
                   exit_threshold: float) -> Dict[str, torch.Tensor]:
    """Token sums of the LM's losses: expected CE under the exit distribution, CE at the Q-exit
    step and at every loop step, and the exit statistics. Shared by every objective."""
    with torch.no_grad():
        log_p = exit_log_distribution(gate_logits.float())
        exit_probs = log_p.exp()
        ce = -label_logprobs.float()
        qexit = q_exit_steps(exit_probs, exit_threshold)
        return {
            "lm_loss": ((exit_probs * ce).sum(dim=0) * mask).sum(),
            "qexit_loss": (ce.gather(0, qexit.unsqueeze(0)).squeeze(0) * mask).sum(),
            "step_ce": (ce * mask).sum(dim=(1, 2)),
            "exit_step": (expected_exit_step(exit_probs) * mask).sum(),
            "exit_entropy": (-(exit_probs * log_p).sum(dim=0) * mask).sum(),
            # Loop steps a token uses at inference with Q-exit at the configured threshold.
            "qexit_steps": ((qexit + 1).to(mask.dtype) * mask).sum(),
            "num_tokens": mask.sum(),
        }
