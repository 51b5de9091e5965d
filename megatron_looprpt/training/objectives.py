"""Per-micro-batch objective for the pipeline schedules: loss, token count, metric sums.

Losses are token sums; megatron-core divides by the global token count in finalize_model_grads
(``calculate_per_token_loss``), so the gradient is that of the mean token loss over the global
batch whatever the layout or micro-batching. Metrics travel as (name -> summed tensor) and are
divided by the token count once they are reduced over micro-batches and data-parallel ranks.

``lm_loss`` is the LM's cross entropy under the exit distribution, whatever is optimised;
``objective`` is the optimised loss (stage 1 includes -beta H(p), stage 2 is the gate's BCE).
"""

from __future__ import annotations

from typing import Dict

import torch

from megatron_looprpt.models.loss import ExitLossConfig, lm_metric_sums, token_loss
from megatron_looprpt.models.looped_gpt import LoopedOutput


def lm_objective(batch: Dict[str, torch.Tensor], output: LoopedOutput, cfg: ExitLossConfig):
    """Loss function handed to megatron's forward step: returns (loss_sum, num_tokens, metrics)."""
    label_logprobs = output.stack("label_logprobs")
    gate_logits = output.stack("gate_logits")
    mask = batch["loss_mask"].to(label_logprobs.dtype)
    loss_sum = (token_loss(label_logprobs, gate_logits, cfg) * mask).sum()
    metrics = lm_metric_sums(label_logprobs, gate_logits, mask, cfg.exit_threshold)
    metrics["objective"] = loss_sum.detach().clone()
    return loss_sum, mask.sum().to(torch.int), metrics
