"""One training (or evaluation) step through megatron-core's pipeline schedules.

Below both the training loop and the RL objectives, which plug their forward steps into it."""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_looprpt.device import compute_device, to_device
from megatron_looprpt.models.looped_gpt import HeadRequest
from megatron_looprpt.models.pipeline import PipelinedModel


def make_forward_step(objective: Callable, head: HeadRequest = HeadRequest()):
    """megatron's forward_step_func: run a chunk on the next micro-batch, bind its loss. The
    micro-batch is already on the device (run_schedule)."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], head=head)
        return output, partial(objective, batch)

    return forward_step


def run_schedule(pm: PipelinedModel, batches: List[Dict[str, torch.Tensor]], forward_step,
                 forward_only: bool) -> Dict[str, torch.Tensor]:
    """Forward(+backward) over the micro-batches of one global batch; returns reduced metric sums
    (identical on every rank)."""
    # Once per micro-batch, not once per chunk that reads it: under PP the T loop chunks each
    # read every micro-batch.
    batches = [to_device(batch) for batch in batches]
    # Every chunk reads the same micro-batches in order, each from its own iterator.
    iterators = [iter(batches) for _ in pm.chunks]
    seq_length, micro_batch_size = batches[0]["tokens"].shape[1], batches[0]["tokens"].shape[0]
    try:
        per_microbatch = pm.forward_backward(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=pm.chunks,
            num_microbatches=len(batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )
    finally:
        pm.model.clear_deferred_steps()
    return reduce_metrics(per_microbatch)


def reduce_metrics(per_microbatch: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Sum metric tensors over micro-batches and data-parallel ranks, then share them with
    every pipeline stage (only the last stage computed them)."""
    names = sorted(per_microbatch[0]) if per_microbatch else []
    # Every rank must agree on the layout of the flat buffer; the last stage knows the names.
    names = _broadcast_names_from_last_stage(names)
    if not names:
        return {}
    sizes, flat = [], []
    for name in names:
        total = sum(m[name].detach().float().reshape(-1) for m in per_microbatch) if per_microbatch else None
        flat.append(total)
        sizes.append(None if total is None else total.numel())
    sizes = _broadcast_names_from_last_stage(sizes)
    device = compute_device()
    flat = [torch.zeros(size, device=device) if value is None else value.to(device)
            for value, size in zip(flat, sizes)]
    buffer = torch.cat(flat)
    dist.all_reduce(buffer, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            buffer.zero_()
        dist.all_reduce(buffer, group=parallel_state.get_pipeline_model_parallel_group())
    return {name: chunk for name, chunk in zip(names, torch.split(buffer, sizes))}


def _broadcast_names_from_last_stage(value):
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return value
    holder = [value]
    group = parallel_state.get_pipeline_model_parallel_group()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast_object_list(holder, src=last, group=group)
    return holder[0]


def train_step(pm: PipelinedModel, optimizer, scheduler, batches, forward_step, global_batch_size: int,
               step_scheduler: bool = True):
    """Forward+backward over one global batch and an optimizer step. ``step_scheduler=False``
    keeps the learning rate where it is (the earlier of several updates on one batch of rollouts)."""
    pm.train()
    if hasattr(pm.stage, "zero_grad_buffer"):
        pm.stage.zero_grad_buffer()
    optimizer.zero_grad()
    metrics = run_schedule(pm, batches, forward_step, forward_only=False)
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful and step_scheduler:
        scheduler.step(increment=global_batch_size)
    metrics["grad_norm"] = torch.tensor(float(grad_norm if grad_norm is not None else 0.0))
    metrics["lr"] = torch.tensor(optimizer.param_groups[0]["lr"])
    return metrics


@torch.no_grad()
def eval_step(pm: PipelinedModel, batches, forward_step):
    pm.eval()
    return run_schedule(pm, batches, forward_step, forward_only=True)
