"""Training objectives of the looped LM (Ouro).

Stage 1: L = sum_t p(t) * CE_t - beta * H(p), the expected cross entropy under the exit
distribution with an entropy bonus that keeps the gate from collapsing onto one step.
Stage 2 (gate training): the backbone is frozen out of the loss (its per-step losses are
detached) and the gate learns to stop when another step stops helping: with the per-token
improvement I_t = max(0, CE_{t-1} - CE_t), the target continue-probability is
w_t = sigmoid(k * (I_t - gamma)) and the gate is trained with binary cross entropy between
(1 - lambda_t) and w_t.

Both return per-token losses [b, s]; reductions over tokens are the caller's (token-weighted,
so that every layout and micro-batching gives the same loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_looprpt.models.exit_gate import exit_log_distribution


@dataclass(frozen=True)
class ExitLossConfig:
    entropy_coef: float = 0.05
    stage: str = "stage1"
    improvement_sharpness: float = 50.0   # k
    improvement_margin: float = 0.005     # gamma
    exit_threshold: float = 0.9           # q of Q-exit, for the steps-used metric


def stage1_token_loss(label_logprobs: torch.Tensor, gate_logits: torch.Tensor,
                      entropy_coef: float) -> torch.Tensor:
    """[T, b, s] inputs -> [b, s] Ouro stage-1 loss."""
    log_p = exit_log_distribution(gate_logits)
    p = log_p.exp()
    expected_ce = -(p * label_logprobs).sum(dim=0)
    exit_entropy = -(p * log_p).sum(dim=0)
    return expected_ce - entropy_coef * exit_entropy


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
    if cfg.stage == "stage2":
        return stage2_token_loss(label_logprobs, gate_logits, cfg)
    return stage1_token_loss(label_logprobs, gate_logits, cfg.entropy_coef)
