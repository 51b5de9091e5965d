"""What the loop chunks of a pipelined looped model do per step, on CPU with stand-ins for the
GPU pieces; dumps per-step observations as JSON. Run with torchrun (PP = world size).

* host-to-device copies: ``device._copy`` becomes a counting clone and ``device._resident``
  recognises its clones, as if the CPU were a second device;
* Transformer Engine's FP8 weight cache: a stand-in module with TE's ``is_first_microbatch``
  protocol (megatron's TELinear passes the flag to TE, then sets it False after its first call;
  ``MegatronModule.set_is_first_microbatch`` sets it True on every module that has it, when
  ``config.fp8`` is set) runs before the stage's first layer and records the flag it sees.
"""

from megatron_looprpt.deferred_compile import defer_megatron_compiles

defer_megatron_compiles()  # before megatron-core is imported: a faster start

import argparse
import json
import os
from functools import partial

import torch
import torch.distributed as dist

from megatron_looprpt import device, parallel
from megatron_looprpt.models.builder import LoopedModelConfig, build_model
from megatron_looprpt.models.loss import ExitLossConfig
from megatron_looprpt.training.objectives import lm_objective
from megatron_looprpt.training.setup import OptimConfig, build_optimizer
from megatron_looprpt.schedule import eval_step, make_forward_step, train_step
from tests.harness.layout_run import sample

_copies = []


def _counting_copy(value, target):
    _copies[-1] += 1
    moved = value.clone()
    moved.on_fake_device = True
    return moved


device._copy = _counting_copy
device._resident = lambda value, target: getattr(value, "on_fake_device", False)


class FakeTELinear(torch.nn.Module):
    """The FP8 weight-cache protocol of megatron's TELinear, without the GEMM."""

    def __init__(self):
        super().__init__()
        self.is_first_microbatch = True
        self.seen = []

    def forward(self):
        self.seen[-1].append(self.is_first_microbatch)
        self.is_first_microbatch = False


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--loops", type=int, default=4)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    pp = int(os.environ["WORLD_SIZE"])
    parallel.initialize(1, pp, seed=7)
    seq, vocab, micro_batch, num_microbatches = 16, 256, 2, 2 * pp
    cfg = LoopedModelConfig(
        num_layers=2 * pp, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
        vocab_size=vocab, max_position_embeddings=64, loop_steps=a.loops, pipeline_parallel=pp,
        make_vocab_size_divisible_by=64,
    )
    pm = build_model(cfg, seed=11)
    pm.model.config.fp8 = "hybrid"   # only what set_is_first_microbatch reads; no TE here
    fake = FakeTELinear()
    first_layer = pm.model.decoder.layers[0]
    first_layer.fake_te = fake
    first_layer.register_forward_pre_hook(lambda module, args, kwargs: fake(), with_kwargs=True)
    optimizer, scheduler = build_optimizer(pm, cfg, OptimConfig(lr=1e-3, global_batch_size=micro_batch * num_microbatches))
    forward_step = make_forward_step(partial(lm_objective, cfg=ExitLossConfig()))
    records = []
    for step, kind in enumerate(["train", "train", "eval"]):
        batches = []
        for m in range(num_microbatches):
            items = [sample(step * 100 + m * micro_batch + i, seq, vocab) for i in range(micro_batch)]
            tokens, labels, mask = (torch.stack(x) for x in zip(*items))
            batches.append({"tokens": tokens, "labels": labels, "loss_mask": mask,
                            "position_ids": torch.arange(seq).expand(micro_batch, -1)})
        _copies.append(0)
        fake.seen.append([])
        if kind == "train":
            train_step(pm, optimizer, scheduler, batches, forward_step, micro_batch * num_microbatches)
        else:
            eval_step(pm, batches, forward_step)
        records.append({"kind": kind, "copies": _copies[-1], "tensors_per_microbatch": len(batches[0]),
                        "microbatches": num_microbatches, "first_layer_calls": fake.seen[-1]})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump(gathered, f)
    parallel.destroy()


if __name__ == "__main__":
    main()
