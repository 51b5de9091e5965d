"""LoopRPT as a per-micro-batch objective for megatron's pipeline schedules.

The loss returned is the SUM over this micro-batch's hard tokens and the token count is the
number of hard tokens, so megatron-core (calculate_per_token_loss) divides the gradient by the
global hard-token count: every layout and micro-batching optimises the same average.

What the rollouts need from the host (the global sample indices that key their randomness) is
read once per step, before the schedule; inside it nothing waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Deque

import torch

from megatron_looprpt.models.looped_gpt import HeadRequest, LoopedOutput
from megatron_looprpt.device import to_device
from megatron_looprpt.models.loss import lm_metric_sums
from megatron_looprpt.rl.looprpt_loss import LoopRPTConfig, StudentOutputs, TeacherOutputs, looprpt_loss
from megatron_looprpt.rl.rollouts import LatentNoise, exit_uniforms
from megatron_looprpt.schedule import train_step

# Metric sums reported by the RL objective; the record divides them as named here.
RL_SUMS_OVER_HARD = ("reward_mean", "pg_loss", "model_loss", "kl_loss", "entropy")


@dataclass(frozen=True)
class RolloutConfig:
    noise_std: float = 0.1
    noise_type: str = "gaussian"
    seed: int = 1234
    gate_only: bool = False   # the policy gradient stops at the exit gate


class PlannedBatch(dict):
    """A micro-batch (its tensors, as the schedules read them) and the host-side sample indices
    of its sequences."""

    sample_ids: tuple = ()


def plan_batches(batches) -> list:
    """The micro-batches with their sample indices read to the host: one transfer per step."""
    ids = torch.stack([batch["sample_ids"] for batch in batches]).tolist()
    planned = []
    for batch, sample_ids in zip(batches, ids):
        item = PlannedBatch(batch)
        item.sample_ids = tuple(sample_ids)
        planned.append(item)
    return planned


def looprpt_objective(batch, sample_ids: tuple, teacher: TeacherOutputs, cfg: LoopRPTConfig,
                      vocab_size: int, rollout: RolloutConfig, output: LoopedOutput):
    label_logprobs = output.stack("label_logprobs")
    gate_logits = output.stack("gate_logits")
    student = StudentOutputs(
        logp=label_logprobs, gate_logits=gate_logits,
        rollout_gate_logits=output.stack("rollout_gate_logits").transpose(0, 1),  # [G, T, b, s]
    )
    uniforms = exit_uniforms(sample_ids, cfg.num_rollouts, label_logprobs.shape[-1], rollout.seed,
                             label_logprobs.device)
    loss_sum, m = looprpt_loss(teacher, student, batch["loss_mask"], vocab_size, cfg, uniforms,
                               normalizer=1.0)
    mask = batch["loss_mask"].to(label_logprobs.dtype)
    metrics = lm_metric_sums(label_logprobs, gate_logits, mask, cfg.exit_threshold)
    metrics.update({
        # LoopRPT's objective is a mean over hard tokens (rl_record divides it so)
        "objective": loss_sum.detach().clone(),
        "rl_hard_tokens": m["num_hard_tokens"],
        "rl_teacher_t_ref": m["teacher_t_ref"] * m["num_valid_tokens"],
        **{f"rl_{name}": m[name] for name in RL_SUMS_OVER_HARD},
    })
    return loss_sum, m["num_hard_tokens"].to(torch.int), metrics


def make_looprpt_forward_step(teacher_outputs: Deque[TeacherOutputs], cfg: LoopRPTConfig,
                              vocab_size: int, rollout: RolloutConfig):
    """Student forward step over PlannedBatch items; the loss of micro-batch m pairs with the
    teacher's m-th output (loss functions run in micro-batch order on the last stage)."""

    def forward_step(data_iterator, model):
        planned = next(data_iterator)
        batch = to_device(planned)
        head = HeadRequest(rollout_noise=LatentNoise(
            planned.sample_ids, cfg.num_rollouts, rollout.noise_std, rollout.noise_type,
            rollout.seed, rollout.gate_only,
        ))
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], head=head)

        def loss(out):
            return looprpt_objective(batch, planned.sample_ids, teacher_outputs.popleft(), cfg,
                                     vocab_size, rollout, out)

        return output, loss

    return forward_step


def rl_record(metrics) -> dict:
    """Per-iteration RL fields for the log, from reduced metric sums."""
    hard = metrics["rl_hard_tokens"].item()
    valid = max(metrics["num_tokens"].item(), 1.0)
    record = {name: metrics[f"rl_{name}"].item() / max(hard, 1.0) for name in RL_SUMS_OVER_HARD}
    record["objective"] = metrics["objective"].item() / max(hard, 1.0)
    record["student_exit_step"] = metrics["exit_step"].item() / valid
    record["teacher_t_ref"] = metrics["rl_teacher_t_ref"].item() / valid
    record["hard_token_fraction"] = hard / valid
    return record


def looprpt_train_step(pm, optimizer, scheduler, teacher, batches, cfg: LoopRPTConfig,
                       vocab_size: int, rollout: RolloutConfig, global_batch_size: int,
                       ema_decay: float):
    """Teacher pass, student forward/backward and optimizer step, then the EMA update."""
    planned = plan_batches(batches)
    teacher_outputs = teacher.run(batches)
    forward_step = make_looprpt_forward_step(teacher_outputs, cfg, vocab_size, rollout)
    metrics = train_step(pm, optimizer, scheduler, planned, forward_step, global_batch_size)
    teacher.update(pm, ema_decay)
    return metrics
