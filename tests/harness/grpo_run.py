"""Two GRPO / RLTT / RPT steps of a tiny looped model under a given layout; dumps their metrics (torchrun).

The prompts are generated problems, tokenised as bytes; the reward is a fixed function of the
sampled answer's token ids (a random-init model never answers a problem right, so the verifier
would give every answer 0 and every advantage 0)."""

from megatron_looprpt.deferred_compile import defer_megatron_compiles

defer_megatron_compiles()  # before megatron-core is imported: a faster start

import argparse
import json

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_looprpt import parallel
from megatron_looprpt.data.prompts import generate_problems
from megatron_looprpt.models.builder import LoopedModelConfig, build_model
from megatron_looprpt.rl.grpo import GRPOConfig, grpo_record, grpo_train_step
from megatron_looprpt.rl.rpt import RPTConfig, rpt_train_step
from megatron_looprpt.rl.teacher import EMATeacher
from megatron_looprpt.training.setup import OptimConfig, build_optimizer


class ByteTokenizer:
    """ASCII bytes; 255 is the end of document. 256 ids pad alike under TP=1 and TP=2."""

    vocab_size, eod, pad = 256, 255, -1

    def tokenize(self, text):
        return list(text.encode("ascii", errors="replace"))[-24:]  # the prompt's end: short sequences

    def detokenize(self, ids):
        return bytes(i for i in ids if i < 255).decode("latin-1")


def parity_reward(text, problem):
    return float(sum(text.encode("latin-1")) % 2)


def corpus_sequence(index: int, seq: int) -> dict:
    """A fixed 'corpus' sequence of printable bytes per global index (GPTDataset's item layout)."""
    g = torch.Generator().manual_seed(500 + index)
    tokens = torch.randint(32, 127, (seq + 1,), generator=g)
    return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(seq),
            "position_ids": torch.arange(seq)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dist-opt", action="store_true")
    p.add_argument("--weights", default="last")
    p.add_argument("--algo", choices=["grpo", "rpt"], default="grpo")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step, over all data-parallel ranks")
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    parallel.initialize(a.tp, a.pp, seed=7)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    prompts_per_step, samples, micro, seq = a.prompts, 4, a.micro, 40
    cfg = LoopedModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
        vocab_size=256, max_position_embeddings=64, loop_steps=2, tensor_parallel=a.tp,
        pipeline_parallel=a.pp, make_vocab_size_divisible_by=64, untie_embeddings_and_output_weights=True,
    )
    global_batch = prompts_per_step * samples
    # as pretrain_looprpt.py does for token-level RL: their loss gives the exit gate no gradient,
    # and megatron-core's overlapped reduction waits for one from every parameter
    pm = build_model(cfg, seed=11, use_distributed_optimizer=a.dist_opt, overlap_grad_reduce=False)
    optimizer, scheduler = build_optimizer(pm, cfg, OptimConfig(
        lr=1e-3, min_lr=1e-4, lr_warmup_iters=0, lr_decay_iters=10, global_batch_size=global_batch,
        use_distributed_optimizer=a.dist_opt))
    reference = EMATeacher(cfg, pm, seed=11)
    grpo = GRPOConfig(num_samples=samples, max_new_tokens=12, kl_coef=0.1, step_weights=a.weights, seed=3,
                      epochs=a.epochs)
    problems = generate_problems(2 * prompts_per_step, seed=5)
    records = []
    for step in range(2):
        per_rank = prompts_per_step // dp
        first = step * prompts_per_step + dp_rank * per_rank
        if a.algo == "rpt":
            sequences = [corpus_sequence(first + i, seq) for i in range(per_rank)]
            metrics = rpt_train_step(pm, optimizer, scheduler, reference, sequences, first, ByteTokenizer(), 256,
                                     grpo, RPTConfig(horizon=3, min_context=8, instruction="?"), seq, micro,
                                     global_batch,
                                     reward_fn=parity_reward)
        else:
            metrics = grpo_train_step(pm, optimizer, scheduler, reference, problems[first:first + per_rank],
                                      first, ByteTokenizer(), 256, grpo, seq, micro, global_batch,
                                      reward_fn=parity_reward)
        records.append(grpo_record(metrics))
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump(records, f)
    parallel.destroy()


if __name__ == "__main__":
    main()
