"""Per-micro-batch objective for the pipeline schedules: loss, token count, metric sums.

Losses are token sums; megatron-core divides by the global token count in finalize_model_grads
(``calculate_per_token_loss``), so the gradient is that of the mean token loss over the global
batch whatever the layout or micro-batching. Metrics travel as (name -> summed tensor) and are
divided by the token count once they are reduced over micro-batches and data-parallel ranks.
"""

from __future__ import annotations

from typing import Dict

import torch

from megatron_looprpt.models.exit_gate import exit_distribution, expected_exit_step, q_exit_steps
from megatron_looprpt.models.loss import ExitLossConfig, token_loss
from megatron_looprpt.models.looped_gpt import LoopedOutput


def lm_objective(batch: Dict[str, torch.Tensor], output: LoopedOutput, cfg: ExitLossConfig):
    """Loss function handed to megatron's forward step: returns (loss_sum, num_tokens, metrics)."""
    label_logprobs = output.stack("label_logprobs")
    gate_logits = output.stack("gate_logits")
    mask = batch["loss_mask"].to(label_logprobs.dtype)
    loss_sum = (token_loss(label_logprobs, gate_logits, cfg) * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    with torch.no_grad():
        exit_probs = exit_distribution(gate_logits)
        metrics = {
            "lm_loss": loss_sum.detach().clone(),
            "step_ce": (-label_logprobs * mask).sum(dim=(1, 2)),
            "exit_step": (expected_exit_step(exit_probs) * mask).sum(),
            # Loop steps a token uses at inference with Q-exit at the configured threshold.
            "qexit_steps": ((q_exit_steps(exit_probs, cfg.exit_threshold) + 1).to(mask.dtype) * mask).sum(),
            "num_tokens": mask.sum(),
        }
    return loss_sum, num_tokens, metrics
