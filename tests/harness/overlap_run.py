"""Train a tiny looped model for a few steps with DDP's overlapped gradient reduction and
parameter gather on or off; dump losses, grad norms, gradients and weights.

Run with torchrun (DP >= 2). Small buckets, so that the backward pass of one loop step can
complete a bucket while other loop steps still have to add to its weights: the case in which
starting the reduction at a bucket's first completion would be wrong.
"""

from megatron_looprpt.deferred_compile import defer_megatron_compiles

defer_megatron_compiles()  # before megatron-core is imported: a faster start

import argparse
import json
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup

from megatron_looprpt import parallel
from megatron_looprpt.models.builder import LoopedModelConfig, build_model
from megatron_looprpt.models.loss import ExitLossConfig
from megatron_looprpt.training.objectives import lm_objective
from megatron_looprpt.training.setup import OptimConfig, build_optimizer
from megatron_looprpt.schedule import make_forward_step, train_step
from tests.harness.layout_run import sample

# Reductions megatron started from a backward hook (overlapped), per step.
_started_in_backward = []
_register = _ParamAndGradBucketGroup.register_grad_ready


def _counting_register(self, param, force_all_reduce=False):
    before = self.grad_reduce_handle
    _register(self, param, force_all_reduce)
    if before is None and self.grad_reduce_handle is not None:
        _started_in_backward[-1] += 1


_ParamAndGradBucketGroup.register_grad_ready = _counting_register


def _flat(tensors) -> list:
    return [float(t.detach().double().sum()) for t in tensors] + \
           [float(t.detach().double().square().sum()) for t in tensors]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--loops", type=int, default=4)
    p.add_argument("--dist-opt", action="store_true")
    p.add_argument("--overlap", action="store_true")
    p.add_argument("--bucket-size", type=int, default=4000)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    parallel.initialize(1, a.pp, seed=7)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    seq, vocab, global_batch, micro_batch = 16, 256, 8, 2
    cfg = LoopedModelConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
        vocab_size=vocab, max_position_embeddings=64, loop_steps=a.loops, pipeline_parallel=a.pp,
        make_vocab_size_divisible_by=64,
    )
    pm = build_model(cfg, seed=11, use_distributed_optimizer=a.dist_opt, overlap_grad_reduce=a.overlap,
                     overlap_param_gather=a.overlap, ddp_bucket_size=a.bucket_size)
    optimizer, scheduler = build_optimizer(pm, cfg, OptimConfig(
        lr=1e-3, min_lr=1e-4, lr_warmup_iters=1, lr_decay_iters=10, global_batch_size=global_batch,
        use_distributed_optimizer=a.dist_opt))
    forward_step = make_forward_step(partial(lm_objective, cfg=ExitLossConfig(entropy_coef=0.05)))
    per_rank = global_batch // dp
    params = [p for p in pm.model.parameters() if p.requires_grad]
    records = []
    for step in range(a.steps):
        base = step * global_batch + dp_rank * per_rank
        batches = []
        for m in range(per_rank // micro_batch):
            items = [sample(base + m * micro_batch + i, seq, vocab) for i in range(micro_batch)]
            tokens, labels, mask = (torch.stack(x) for x in zip(*items))
            batches.append({"tokens": tokens, "labels": labels, "loss_mask": mask,
                            "position_ids": torch.arange(seq).expand(micro_batch, -1)})
        _started_in_backward.append(0)
        metrics = train_step(pm, optimizer, scheduler, batches, forward_step, global_batch)
        pm.sync_params()
        n = metrics["num_tokens"].item()
        record = {"loss": metrics["lm_loss"].item() / n, "grad_norm": metrics["grad_norm"].item(),
                  "params": _flat(params), "started_in_backward": _started_in_backward[-1]}
        if not a.dist_opt:
            # all-reduced, so every parameter's whole gradient (the distributed optimizer
            # reduce-scatters each bucket: which part a rank holds depends on the buckets)
            record["grads"] = _flat([param.main_grad for param in params])
        records.append(record)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    if dist.get_rank() == 0:
        bucket_groups = len(pm.stage.bucket_groups)
        with open(a.out, "w") as f:
            json.dump({"ranks": gathered, "bucket_groups": bucket_groups}, f)
    parallel.destroy()


if __name__ == "__main__":
    main()
