"""Looped pipeline parallelism: the loop steps are the virtual pipeline chunks.

With PP stages, stage p holds layers [p*N/PP, (p+1)*N/PP) of the block. megatron-core's
interleaved 1F1B schedule runs V virtual chunks per stage and sends a microbatch leaving the
last stage's chunk v into the first stage's chunk v+1. Taking V = T and making chunk v "loop
step v through this stage's layers" turns that schedule into the loop: the hidden state goes
around the ring T times, each stage keeps 1/PP of the weights, and the bubble is the
interleaved schedule's, (PP-1)/(T*M) of the step for M microbatches.

What megatron-core does not do for us, and this module does:
  * one set of weights for all T chunks: the chunks are views of ONE DDP-wrapped stage module,
    so there is one gradient buffer; gradients of the T uses accumulate in it and each bucket
    is reduced once, when the last chunk's backward has filled it (overlap_grad_reduce; see
    training/setup.py) or by finalize_model_grads over that single module;
  * the loop index of each chunk (``LoopStepChunk.loop_step``);
  * per-step head outputs on the last stage (``LoopedGPTModel`` defers steps < T-1 to the
    loss of step T-1 and feeds their gradient back, see ``_AddDeferredGrad``);
  * checkpoint keys: the checkpoint is the stage module's, so nothing is duplicated T times.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, List

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_looprpt.models.looped_gpt import LoopedGPTModel


class LoopStepChunk(torch.nn.Module):
    """Virtual pipeline chunk v: loop step v through this stage's layers."""

    def __init__(self, stage: torch.nn.Module, model: LoopedGPTModel, loop_step: int,
                 schedule_config: TransformerConfig):
        super().__init__()
        # Plain attributes, not submodules: the chunks share the stage's parameters and must
        # not register them again.
        self.__dict__["stage"] = stage
        self.__dict__["model"] = model
        self.loop_step = loop_step
        self.vp_stage = loop_step
        self.config = schedule_config
        self.model_type = model.model_type

    def set_input_tensor(self, input_tensor) -> None:
        self.model.set_input_tensor(input_tensor)

    def set_is_first_microbatch(self) -> None:
        """megatron's schedules call this on a chunk before its first micro-batch of a step,
        and only if the chunk has it (schedules.forward_step); Transformer Engine then recasts
        its cached FP8 weights at the next call. The T chunks share one set of weights, and
        loop step 0 of the first micro-batch is the first to run on every stage, so chunk 0
        passes it on and the other chunks' calls would only recast the same weights again."""
        if self.loop_step == 0:
            self.stage.set_is_first_microbatch()

    def forward(self, *args, **kwargs):
        return self.stage(*args, loop_step=self.loop_step, **kwargs)


@dataclass
class PipelinedModel:
    """What the training loop drives: schedule chunks over one wrapped stage module."""

    chunks: List[torch.nn.Module]
    stage: torch.nn.Module          # DDP-wrapped (or bare) stage module that owns the weights
    model: LoopedGPTModel           # the unwrapped stage
    schedule_config: TransformerConfig
    forward_backward: Callable

    def train(self, mode: bool = True):
        self.stage.train(mode)

    def eval(self):
        self.stage.train(False)

    def sync_params(self) -> None:
        """Make every weight current on this rank. With the parameter all-gather overlapped
        (``overlap_param_gather``), an optimizer step updates only this rank's shard and the
        next forward pass gathers the rest; anything that reads the weights before then (a
        checkpoint save) waits here."""
        ddp_config = getattr(self.stage, "ddp_config", None)
        if ddp_config is not None and ddp_config.overlap_param_gather:
            # collective over DP; the buckets count as gathered afterwards, so the next forward
            # pass does not gather them again (param_and_grad_buffer.py, finish_param_sync)
            self.stage.start_param_sync(force_sync=True)


def pipeline_model(stage: torch.nn.Module, model: LoopedGPTModel, pipeline_parallel: int) -> PipelinedModel:
    """Arrange a (DDP-wrapped) stage module for megatron-core's pipeline schedules."""
    config = model.config
    loop_steps = model.loop_steps
    if pipeline_parallel == 1:
        model.loops_inside = True
        schedule_config = config
        chunks = [stage]
        forward_backward = get_forward_backward_func(pp_size=1, vp_size=None)
    else:
        model.loops_inside = False
        # The schedule reads the virtual size from the config of model[0]; the stage's own
        # config keeps None so that it builds N/PP layers rather than N/(PP*T).
        schedule_config = copy.copy(config)
        interleaved = loop_steps > 1
        schedule_config.virtual_pipeline_model_parallel_size = loop_steps if interleaved else None
        schedule_config.microbatch_group_size_per_vp_stage = pipeline_parallel
        # As Megatron-LM runs the interleaved schedule: unbatched, overlapped p2p. The batched
        # form posts sends and receives to one peer in an order that gloo pairs crosswise when
        # the previous and next stage are the same rank (PP=2).
        schedule_config.overlap_p2p_comm = interleaved
        schedule_config.batch_p2p_comm = not interleaved
        chunks = [LoopStepChunk(stage, model, v, schedule_config) for v in range(loop_steps)]
        forward_backward = get_forward_backward_func(
            pp_size=pipeline_parallel, vp_size=loop_steps if interleaved else None
        )

    def finalize(_chunks, num_tokens=None, pg_collection=None, force_all_reduce=False):
        finalize_model_grads([stage], num_tokens, pg_collection=pg_collection,
                             force_all_reduce=force_all_reduce)

    schedule_config.finalize_model_grads_func = finalize
    if hasattr(stage, "no_sync"):
        schedule_config.no_sync_func = stage.no_sync
    return PipelinedModel(chunks, stage, model, schedule_config, forward_backward)
