"""The EMA teacher: a second copy of the model, sharded exactly like the student.

It is built with the student's TP/PP layout, so each rank holds the teacher shard that matches
its student shard and the update teacher = decay * teacher + (1 - decay) * student is local:
no communication. It runs through the same megatron pipeline schedules (forward only) and
hands its per-step outputs to the student's loss, micro-batch by micro-batch, on the last stage.

The EMA is kept in fp32: a bf16 teacher could not absorb (1 - decay)-sized increments. Where
that fp32 state lives:

* fp32 runs: the teacher's own weights are the EMA.
* bf16 runs with the distributed optimizer: DP-sharded like the student's main parameters
  (``sharded_ema.py``); after each update the bf16 weights are all-gathered over DP.
* other bf16 runs: an fp32 copy of the stage (``store``, never run), replicated like the rest
  of the model; the bf16 compute weights are refreshed from it after each update.

``store`` is what checkpoints see (``sharded_state_dict`` / ``load_state_dict`` of a module
with the teacher's layout), so the teacher reshards with the student across TP/PP/DP.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Deque

import torch

from megatron_looprpt.models.builder import LoopedModelConfig, build_model, build_stage
from megatron_looprpt.models.looped_gpt import HeadRequest
from megatron_looprpt.rl.ema import copy_params_, ema_update_
from megatron_looprpt.rl.sharded_ema import DPShardedEMA, distributed_optimizer_buffers
from megatron_looprpt.device import to_device
from megatron_looprpt.rl.looprpt_loss import TeacherOutputs

_TEACHER_HEAD = HeadRequest(label_logprobs=True, entropy=True, recompute=False)


class EMATeacher:
    def __init__(self, cfg: LoopedModelConfig, student, seed: int):
        self.pm = build_model(cfg, seed=seed, wrap_ddp=False)
        self.params = list(self.pm.model.parameters())
        for param in self.params:
            param.requires_grad_(False)
        student_params = list(student.model.parameters())
        buffers = distributed_optimizer_buffers(student.stage)
        self.sharded = None
        self.ema = []
        if all(p.dtype == torch.float32 for p in self.params):
            self.store = self.pm.model
            self.ema = self.params
        elif buffers is not None and all(p.requires_grad for p in student_params):
            self.sharded = DPShardedEMA(cfg, buffers, student_params, self.params,
                                        buffers[0].data_parallel_group)
            self.store = self.sharded.checkpoint_module()
        else:
            self.store = build_stage(dataclasses.replace(cfg, bf16=False, fp8_format=None))
            self.store.requires_grad_(False)
            self.ema = list(self.store.parameters())
        self.reset_to(student)

    @torch.no_grad()
    def reset_to(self, student) -> None:
        """Teacher = student (the start of a LoopRPT run)."""
        if self.sharded is not None:
            self.sharded.reset_to_student()
        else:
            copy_params_(self.ema, [p.detach().float() for p in student.model.parameters()])
        self.publish()

    @torch.no_grad()
    def publish(self) -> None:
        """Refresh the compute weights from the EMA state (after an update or a load)."""
        if self.sharded is not None:
            self.sharded.publish()
        elif self.store is not self.pm.model:
            copy_params_(self.params, [e.to(p.dtype) for e, p in zip(self.ema, self.params)])

    @torch.no_grad()
    def update(self, student, decay: float) -> None:
        if self.sharded is not None:
            self.sharded.update(decay)
        else:
            ema_update_(self.ema, [p.detach().float() for p in student.model.parameters()], decay)
        self.publish()

    def ema_state_bytes(self) -> int:
        """Bytes of fp32 EMA state this rank holds beyond the teacher's compute weights."""
        if self.sharded is not None:
            return self.sharded.nbytes()
        if self.store is self.pm.model:
            return 0
        return sum(e.numel() * e.element_size() for e in self.ema)

    def sharded_state_dict(self, prefix: str = "teacher."):
        return self.store.sharded_state_dict(prefix=prefix)

    def run(self, batches) -> Deque[TeacherOutputs]:
        """Teacher outputs for each micro-batch, in order (filled on the last stage only)."""
        return forward_outputs(self.pm, batches)


@torch.no_grad()
def forward_outputs(pm, batches) -> Deque[TeacherOutputs]:
    """A model's per-step gold log-probs, gate logits and entropies for each micro-batch, in
    order, through the pipeline schedule, forward only (filled on the last stage only)."""
    collected: Deque[TeacherOutputs] = collections.deque()

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator))
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       head=_TEACHER_HEAD)

        def collect(out):
            collected.append(TeacherOutputs(
                logp=out.stack("label_logprobs"), gate_logits=out.stack("gate_logits"),
                entropy=out.stack("entropy"),
            ))
            return torch.zeros(()), torch.tensor(0, dtype=torch.int), {}

        return output, collect

    pm.eval()
    iterators = [iter(batches) for _ in pm.chunks]
    try:
        pm.forward_backward(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=pm.chunks,
            num_microbatches=len(batches),
            seq_length=batches[0]["tokens"].shape[1],
            micro_batch_size=batches[0]["tokens"].shape[0],
            forward_only=True,
        )
    finally:
        pm.model.clear_deferred_steps()
    return collected
