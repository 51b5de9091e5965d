"""The EMA teacher: a second copy of the model, sharded exactly like the student.

It is built with the student's TP/PP layout, so each rank holds the teacher shard that matches
its student shard and the update teacher = decay * teacher + (1 - decay) * student is local:
no communication. It runs through the same megatron pipeline schedules (forward only) and
hands its per-step outputs to the student's loss, micro-batch by micro-batch, on the last stage.

The EMA is kept in fp32 (a bf16 teacher cannot absorb (1 - decay)-sized increments); with bf16
training the fp32 EMA lives beside the bf16 compute copy that the forward pass reads.
"""

from __future__ import annotations

import collections
from typing import Deque, List

import torch

from megatron_looprpt.models.builder import LoopedModelConfig
from megatron_looprpt.models.looped_gpt import HeadRequest
from megatron_looprpt.rl.ema import copy_params_, ema_update_
from megatron_looprpt.rl.looprpt_loss import TeacherOutputs
from megatron_looprpt.training.setup import build_model

_TEACHER_HEAD = HeadRequest(label_logprobs=True, entropy=True, recompute=False)


class EMATeacher:
    def __init__(self, cfg: LoopedModelConfig, student, seed: int):
        self.pm = build_model(cfg, seed=seed, wrap_ddp=False)
        self.params: List[torch.nn.Parameter] = list(self.pm.model.parameters())
        for param in self.params:
            param.requires_grad_(False)
        student_params = list(student.model.parameters())
        self.fp32_params = all(p.dtype == torch.float32 for p in self.params)
        if self.fp32_params:
            # The teacher's own weights are the EMA state: no second copy.
            copy_params_(self.params, [p.detach() for p in student_params])
            self.ema = self.params
        else:
            self.ema = [p.detach().float().clone() for p in student_params]
            self._publish()

    @torch.no_grad()
    def _publish(self) -> None:
        if not self.fp32_params:
            copy_params_(self.params, [e.to(p.dtype) for e, p in zip(self.ema, self.params)])

    @torch.no_grad()
    def update(self, student, decay: float) -> None:
        ema_update_(self.ema, [p.detach().float() for p in student.model.parameters()], decay)
        self._publish()

    @torch.no_grad()
    def run(self, batches) -> Deque[TeacherOutputs]:
        """Teacher outputs for each micro-batch, in order (filled on the last stage only)."""
        collected: Deque[TeacherOutputs] = collections.deque()

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                           head=_TEACHER_HEAD)

            def collect(out):
                collected.append(TeacherOutputs(
                    logp=out.stack("label_logprobs"), gate_logits=out.stack("gate_logits"),
                    entropy=out.stack("entropy"),
                ))
                return torch.zeros(()), torch.tensor(0, dtype=torch.int), {}

            return output, collect

        self.pm.eval()
        iterators = [iter(batches) for _ in self.pm.chunks]
        try:
            self.pm.forward_backward(
                forward_step_func=forward_step,
                data_iterator=iterators if len(iterators) > 1 else iterators[0],
                model=self.pm.chunks,
                num_microbatches=len(batches),
                seq_length=batches[0]["tokens"].shape[1],
                micro_batch_size=batches[0]["tokens"].shape[0],
                forward_only=True,
            )
        finally:
            self.pm.model.clear_deferred_steps()
        return collected
