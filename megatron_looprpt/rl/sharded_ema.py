"""The teacher's fp32 EMA state, sharded across data-parallel ranks like the distributed
optimizer's main parameters.

In a bf16 run the teacher computes with bf16 weights but must keep its EMA in fp32. Replicated,
that fp32 copy costs every DP rank 4 bytes per parameter of its model-parallel shard; with the
distributed optimizer the student's own fp32 state is split over DP, and so is the teacher's
here. The student's DDP buffers fix the split: each bucket is cut into DP equal slices and DP
rank r owns slice r (the optimizer's ranges). The teacher's bf16 weights live in a flat buffer
laid out exactly as the student's param buffer, so:

* update: each rank moves its fp32 slice towards the student's weights on that slice (local);
* publish: each rank casts its slice into the teacher buffer and the buckets are all-gathered
  over DP, the collective the distributed optimizer runs for the student's own weights after
  every step;
* checkpoint: ``checkpoint_module()`` stands in for a module; saving gathers the slices into a
  transient fp32 copy of the stage (megatron-core stores global tensors, so the teacher
  reshards like the student), loading slices the restored copy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_looprpt.models.builder import LoopedModelConfig, build_stage


@dataclass
class _Placement:
    """Where one parameter lies in its bucket, and which part of it this rank owns."""

    teacher: torch.nn.Parameter
    student: torch.nn.Parameter
    bucket_start: int            # the parameter's range in the bucket
    bucket_end: int
    owned_start: int = 0         # this rank's part, in the parameter's flat index
    owned_end: int = 0
    slice_offset: int = 0        # where that part starts in this rank's fp32 slice


@dataclass
class _Bucket:
    teacher_data: torch.Tensor   # the teacher's weights of this bucket (compute dtype, all ranks')
    ema: torch.Tensor            # this rank's fp32 slice of it
    placements: List[_Placement]

    @property
    def slice_size(self) -> int:
        return self.ema.numel()


def distributed_optimizer_buffers(student_stage) -> Optional[list]:
    """The student's DDP param buffers when it trains with the distributed optimizer."""
    ddp_config = getattr(student_stage, "ddp_config", None)
    if ddp_config is None or not ddp_config.use_distributed_optimizer:
        return None
    return list(student_stage.buffers) + list(student_stage.expert_parallel_buffers)


class DPShardedEMA:
    def __init__(self, cfg: LoopedModelConfig, buffers: list, student_params: List[torch.nn.Parameter],
                 teacher_params: List[torch.nn.Parameter], dp_group):
        self.cfg, self.group = cfg, dp_group
        self.rank, self.size = dist.get_rank(dp_group), dist.get_world_size(dp_group)
        self.teacher_params = list(teacher_params)
        pairs = dict(zip(student_params, teacher_params))
        self.buckets: List[_Bucket] = []
        placed = 0
        for buffer in buffers:
            teacher_flat = torch.zeros_like(buffer.param_data)
            by_bucket = {}
            for student, (start, end, bucket_id) in buffer.param_index_map.items():
                teacher = pairs[student]
                # the teacher's weights become views into the flat buffer, as DDP does for the student
                teacher.data = teacher_flat[start:end].view_as(teacher)
                by_bucket.setdefault(bucket_id, []).append((student, teacher, start, end))
            for bucket in buffer.buckets:
                size = bucket.param_data.numel()
                slice_size = size // self.size
                own_start = bucket.offset + self.rank * slice_size
                own_end = own_start + slice_size
                placements = []
                for student, teacher, start, end in by_bucket.get(bucket.bucket_id, []):
                    place = _Placement(teacher, student, start - bucket.offset, end - bucket.offset)
                    lo, hi = max(start, own_start), min(end, own_end)
                    if lo < hi:
                        place.owned_start, place.owned_end = lo - start, hi - start
                        place.slice_offset = lo - own_start
                    placements.append(place)
                placed += len(placements)
                self.buckets.append(_Bucket(
                    teacher_data=teacher_flat[bucket.offset:bucket.offset + size],
                    ema=torch.zeros(slice_size, dtype=torch.float32, device=teacher_flat.device),
                    placements=placements))
        if placed != len(teacher_params):
            raise ValueError(f"{len(teacher_params) - placed} teacher parameters have no place in the "
                             "student's DDP buffers (frozen parameters cannot be DP-sharded)")

    def _owned(self):
        for bucket in self.buckets:
            for place in bucket.placements:
                if place.owned_end > place.owned_start:
                    n = place.owned_end - place.owned_start
                    yield (bucket.ema[place.slice_offset:place.slice_offset + n],
                           place.student.detach().view(-1)[place.owned_start:place.owned_end])

    @torch.no_grad()
    def reset_to_student(self) -> None:
        for ema, student in self._owned():
            ema.copy_(student)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """ema = decay * ema + (1 - decay) * student, on this rank's slices: no communication."""
        owned = list(self._owned())
        if owned:
            emas, students = zip(*owned)
            torch._foreach_lerp_(list(emas), [s.float() for s in students], 1.0 - decay)

    @torch.no_grad()
    def publish(self) -> None:
        """The teacher's compute weights from the fp32 slices: cast locally, gather over DP."""
        for bucket in self.buckets:
            mine = bucket.teacher_data[self.rank * bucket.slice_size:(self.rank + 1) * bucket.slice_size]
            mine.copy_(bucket.ema)
            dist.all_gather_into_tensor(bucket.teacher_data, mine.clone(), group=self.group)

    def nbytes(self) -> int:
        return sum(b.ema.numel() * b.ema.element_size() for b in self.buckets)

    def checkpoint_module(self) -> "_GatheredEMA":
        return _GatheredEMA(self)


class _GatheredEMA:
    """The EMA as checkpointing sees it: ``sharded_state_dict`` / ``load_state_dict`` of a
    transient fp32 copy of the stage (built per call, gathered from / sliced into the shards)."""

    def __init__(self, ema: DPShardedEMA):
        self.ema = ema

    def _stage(self):
        """A fp32 stage and, for each teacher parameter, its counterpart there (both are built
        by build_stage from the same config, so their parameters come in the same order)."""
        stage = build_stage(dataclasses.replace(self.ema.cfg, bf16=False, fp8_format=None))
        stage.requires_grad_(False)
        return stage, dict(zip(self.ema.teacher_params, stage.parameters()))

    @torch.no_grad()
    def sharded_state_dict(self, prefix: str = ""):
        stage, stage_param = self._stage()
        for bucket in self.ema.buckets:
            full = torch.empty(bucket.slice_size * self.ema.size, dtype=torch.float32, device=bucket.ema.device)
            dist.all_gather_into_tensor(full, bucket.ema, group=self.ema.group)
            for place in bucket.placements:
                target = stage_param[place.teacher]
                target.copy_(full[place.bucket_start:place.bucket_end].view_as(target))
        return stage.sharded_state_dict(prefix=prefix)

    @torch.no_grad()
    def load_state_dict(self, state_dict, strict: bool = True):
        stage, stage_param = self._stage()
        result = stage.load_state_dict(state_dict, strict=strict)
        for bucket in self.ema.buckets:
            for place in bucket.placements:
                if place.owned_end > place.owned_start:
                    n = place.owned_end - place.owned_start
                    bucket.ema[place.slice_offset:place.slice_offset + n].copy_(
                        stage_param[place.teacher].view(-1)[place.owned_start:place.owned_end])
        return result
