"""Benchmark: a LoopRPT iteration against an LM-only iteration on the same batch, and the
teacher's memory per rank.

Both iterations run the full megatron path (pipeline schedule, DDP, optimizer step); the
LoopRPT one adds the EMA teacher's forward pass, the rollouts (gate re-evaluated on G noisy
latents of the student's single forward pass, block by block under activation checkpoints, with
the policy gradient flowing back through the latents into the backbone: LoopRPT's defaults) and
the EMA update. They alternate over repeated trials in one process and the medians are compared.
The floor is the LM iteration plus one teacher forward pass (no backward, no head recomputation).

    python tools/bench_looprpt.py [--loop-steps 4 --rl-num-rollouts 8 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import add_shape_args, timed  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.add_argument("--num-microbatches", type=int, default=2)
    p.add_argument("--rl-num-rollouts", type=int, default=8)
    p.add_argument("--use-distributed-optimizer", action="store_true",
                   help="under torchrun (data parallel): shard the optimizer and, in bf16, the teacher's fp32 EMA")
    p.add_argument("--out", default=None)
    return p.parse_args()


def main():
    a = parse()
    import torch

    from megatron_looprpt import parallel
    from megatron_looprpt.models.builder import LoopedModelConfig
    from megatron_looprpt.models.loss import ExitLossConfig
    from megatron_looprpt.rl.looprpt_loss import LoopRPTConfig
    from megatron_looprpt.rl.objective import RolloutConfig, looprpt_train_step
    from megatron_looprpt.rl.teacher import EMATeacher
    from megatron_looprpt.training.objectives import lm_objective
    from megatron_looprpt.models.builder import build_model
    from megatron_looprpt.training.setup import OptimConfig, build_optimizer
    from megatron_looprpt.schedule import make_forward_step, train_step

    device = parallel.initialize(1, 1, seed=1)
    cfg = LoopedModelConfig(
        num_layers=a.num_layers, hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
        ffn_hidden_size=a.ffn_hidden_size, vocab_size=a.vocab_size, max_position_embeddings=a.seq_length,
        loop_steps=a.loop_steps, bf16=a.bf16,
    )
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    global_batch = a.micro_batch_size * a.num_microbatches * dp
    pm = build_model(cfg, seed=1, use_distributed_optimizer=a.use_distributed_optimizer)
    optimizer, scheduler = build_optimizer(pm, cfg, OptimConfig(
        global_batch_size=global_batch, use_distributed_optimizer=a.use_distributed_optimizer))
    teacher = EMATeacher(cfg, pm, seed=1)
    rl_cfg = LoopRPTConfig(num_rollouts=a.rl_num_rollouts)
    lm_forward = make_forward_step(partial(lm_objective, cfg=ExitLossConfig()))

    generator = torch.Generator().manual_seed(0)
    batches = []
    for m in range(a.num_microbatches):
        tokens = torch.randint(0, a.vocab_size, (a.micro_batch_size, a.seq_length + 1), generator=generator)
        batches.append({
            "tokens": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device),
            "loss_mask": torch.ones(a.micro_batch_size, a.seq_length, device=device),
            "position_ids": torch.arange(a.seq_length, device=device).expand(a.micro_batch_size, -1),
            "sample_ids": torch.arange(m * a.micro_batch_size, (m + 1) * a.micro_batch_size),
        })

    def lm_iteration():
        train_step(pm, optimizer, scheduler, batches, lm_forward, global_batch)

    def rl_iteration():
        looprpt_train_step(pm, optimizer, scheduler, teacher, batches, rl_cfg, a.vocab_size,
                           RolloutConfig(), global_batch, 0.995)

    for _ in range(a.warmup):
        lm_iteration()
        rl_iteration()
    lm_times, rl_times, teacher_times = [], [], []
    for _ in range(a.trials):
        lm_times.append(timed(lm_iteration, device))
        rl_times.append(timed(rl_iteration, device))
        teacher_times.append(timed(lambda: teacher.run(batches), device))

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    student_param_bytes = nbytes(pm.model.parameters())
    teacher_bytes = nbytes(teacher.params) + teacher.ema_state_bytes()
    result = {
        "device": str(device),
        "lm_iteration_s": statistics.median(lm_times),
        "looprpt_iteration_s": statistics.median(rl_times),
        "ratio": statistics.median(rl_times) / statistics.median(lm_times),
        "teacher_forward_s": statistics.median(teacher_times),
        # the floor: an LM iteration plus the teacher's forward pass
        "floor_ratio": (statistics.median(lm_times) + statistics.median(teacher_times)) / statistics.median(lm_times),
        "teacher_bytes_per_rank": teacher_bytes,
        "student_param_bytes_per_rank": student_param_bytes,
        "rollouts": a.rl_num_rollouts,
        "loop_steps": a.loop_steps,
    }
    result["data_parallel_size"] = dp
    result["teacher_ema_state_bytes_per_rank"] = teacher.ema_state_bytes()
    if torch.distributed.get_rank() != 0:
        parallel.destroy()
        return
    print(json.dumps(result, indent=2))
    print(f"LoopRPT / LM iteration time = {result['ratio']:.3f} (target <= 1.5; the floor, LM + teacher "
          f"forward, is {result['floor_ratio']:.3f}); "
          f"teacher memory per rank {teacher_bytes / 2**20:.2f} MiB "
          f"({teacher_bytes / student_param_bytes:.2f}x the student's parameters; fp32 EMA state "
          f"{teacher.ema_state_bytes() / 2**20:.2f} MiB, DP={dp})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    parallel.destroy()


if __name__ == "__main__":
    main()
