"""Train a tiny looped model for a few steps under a given layout and dump losses/grad norms.

Run with torchrun (any world size); used by the layout-parity tests. Batches are a fixed,
seeded function of the global sample index, so every layout sees the same global batches.
"""

from megatron_looprpt.deferred_compile import defer_megatron_compiles

defer_megatron_compiles()  # before megatron-core is imported: a faster start

import argparse
import json

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_looprpt import parallel
from megatron_looprpt.models.builder import LoopedModelConfig, build_model
from megatron_looprpt.models.loss import ExitLossConfig
from megatron_looprpt.training.objectives import lm_objective
from megatron_looprpt.training.setup import OptimConfig, build_optimizer
from megatron_looprpt.schedule import make_forward_step, train_step
from functools import partial

from megatron_looprpt.rl.looprpt_loss import LoopRPTConfig
from megatron_looprpt.rl.objective import RolloutConfig, looprpt_train_step, rl_record
from megatron_looprpt.rl.teacher import EMATeacher
from megatron_looprpt.schedule import reduce_metrics


def sample(index: int, seq: int, vocab: int):
    g = torch.Generator().manual_seed(1000 + index)
    tokens = torch.randint(0, vocab, (seq + 1,), generator=g)
    mask = torch.ones(seq)
    mask[: index % 3] = 0.0  # uneven token counts across micro-batches
    return tokens[:-1], tokens[1:], mask


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--loops", type=int, default=2)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--dist-opt", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--rl", action="store_true", help="LoopRPT iterations instead of LM")
    p.add_argument("--tied", action="store_true", help="output layer tied to the embedding")
    p.add_argument("--loop-step-embedding", action="store_true", help="a learned input vector per loop step")
    p.add_argument("--loop-input-injection", action="store_true", help="later steps re-read the embedding")
    p.add_argument("--loop-carry", default="normed", choices=["normed", "residual"])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    parallel.initialize(a.tp, a.pp, seed=7)
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    seq, vocab = 16, 256
    cfg = LoopedModelConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
        vocab_size=vocab, max_position_embeddings=64, loop_steps=a.loops, tensor_parallel=a.tp,
        pipeline_parallel=a.pp, sequence_parallel=a.sp, make_vocab_size_divisible_by=64,
        untie_embeddings_and_output_weights=not a.tied, loop_step_embedding=a.loop_step_embedding,
        loop_input_injection=a.loop_input_injection, loop_carry=a.loop_carry,
    )
    pm = build_model(cfg, seed=11, use_distributed_optimizer=a.dist_opt)
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, lr_warmup_iters=1, lr_decay_iters=10,
                        global_batch_size=a.global_batch, use_distributed_optimizer=a.dist_opt)
    optimizer, scheduler = build_optimizer(pm, cfg, optim)
    forward_step = make_forward_step(partial(lm_objective, cfg=ExitLossConfig(entropy_coef=0.05)))
    if a.rl:
        rl_cfg = LoopRPTConfig(num_rollouts=4, hard_token_ratio=0.5, kl_coef=0.01)
        teacher = EMATeacher(cfg, pm, seed=11)
    per_rank = a.global_batch // dp
    records = []
    for step in range(a.steps):
        base = step * a.global_batch + dp_rank * per_rank
        batches = []
        for m in range(per_rank // a.micro_batch):
            items = [sample(base + m * a.micro_batch + i, seq, vocab) for i in range(a.micro_batch)]
            tokens, labels, mask = (torch.stack(x) for x in zip(*items))
            first = base + m * a.micro_batch
            batches.append({"tokens": tokens, "labels": labels, "loss_mask": mask,
                            "position_ids": torch.arange(seq).expand(a.micro_batch, -1),
                            "sample_ids": torch.arange(first, first + a.micro_batch)})
        if a.rl:
            metrics = looprpt_train_step(pm, optimizer, scheduler, teacher, batches, rl_cfg, vocab,
                                         RolloutConfig(noise_std=0.5, seed=5), a.global_batch, 0.9)
        else:
            metrics = train_step(pm, optimizer, scheduler, batches, forward_step, a.global_batch)
        n = metrics["num_tokens"].item()
        record = {"loss": metrics["lm_loss"].item() / n, "grad_norm": metrics["grad_norm"].item(),
                  "step_ce": (metrics["step_ce"] / n).tolist(), "exit_step": metrics["exit_step"].item() / n}
        if a.rl:
            record.update(rl_record(metrics))
            # The teacher's weights, probed through its outputs on this global batch.
            probe = teacher.run(batches)
            sums = [{"probe": (out.logp * b["loss_mask"]).sum()} for out, b in zip(probe, batches)]
            record["teacher_probe"] = reduce_metrics(sums)["probe"].item()
        records.append(record)
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump(records, f)
    parallel.destroy()


if __name__ == "__main__":
    main()
