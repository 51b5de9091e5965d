"""The bf16 EMA teacher under a given layout, checked against the EMA computed directly.

Run with torchrun. Trains a tiny bf16 student for a few LM steps; after each optimizer step the
teacher takes its EMA update and a reference EMA is computed directly on full fp32 tensors, the
closed-form way (ref = decay * ref + (1 - decay) * student). Dumps what the test compares: which
kind of EMA state the teacher keeps and its bytes, whether the teacher's bf16 weights and its
checkpointed fp32 state equal the reference, and (--save/--load) the state across a checkpoint.
"""

from megatron_looprpt.deferred_compile import defer_megatron_compiles

defer_megatron_compiles()  # before megatron-core is imported: a faster start

import argparse
import json
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_looprpt import parallel
from megatron_looprpt.models.builder import LoopedModelConfig, build_model
from megatron_looprpt.models.loss import ExitLossConfig
from megatron_looprpt.rl.ema import ema_update_
from megatron_looprpt.rl.teacher import EMATeacher
from megatron_looprpt.training import checkpointing
from megatron_looprpt.training.objectives import lm_objective
from megatron_looprpt.training.setup import OptimConfig, build_optimizer
from megatron_looprpt.schedule import make_forward_step, train_step
from tests.harness.layout_run import sample

DECAY = 0.7  # far from 1, so that every update moves the teacher by a visible amount


def checkpointed_state(teacher) -> dict:
    """The teacher's fp32 EMA as its checkpoint holds it: parameter name -> tensor."""
    sharded = teacher.store.sharded_state_dict(prefix="")
    return {k: v.data.clone() for k, v in sharded.items() if hasattr(v, "data") and torch.is_tensor(v.data)
            and not k.endswith("_extra_state")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dist-opt", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--save", default=None)
    p.add_argument("--load", default=None, help="only load the teacher from here and dump its state")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    parallel.initialize(a.tp, 1, seed=7)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    seq, vocab, global_batch, micro = 16, 256, 8, 2
    cfg = LoopedModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
        vocab_size=vocab, max_position_embeddings=64, loop_steps=2, tensor_parallel=a.tp,
        make_vocab_size_divisible_by=64, untie_embeddings_and_output_weights=True, bf16=True,
    )
    pm = build_model(cfg, seed=11, use_distributed_optimizer=a.dist_opt)
    optimizer, scheduler = build_optimizer(pm, cfg, OptimConfig(
        lr=1e-2, min_lr=1e-3, lr_warmup_iters=0, lr_decay_iters=10, global_batch_size=global_batch,
        use_distributed_optimizer=a.dist_opt))
    teacher = EMATeacher(cfg, pm, seed=11)
    result = {"kind": "sharded" if teacher.sharded is not None else "replicated",
              "ema_state_bytes": teacher.ema_state_bytes(),
              "param_count": sum(p.numel() for p in pm.model.parameters())}

    if a.load:
        loaded = checkpointing.load_checkpoint(a.load, pm, None, None, load_rng=False,
                                               extra_models={"teacher": teacher.store})
        assert loaded.extra_models == ["teacher"]
        teacher.publish()
        result["state"] = {k: v.tolist() for k, v in checkpointed_state(teacher).items()}
    else:
        forward_step = make_forward_step(partial(lm_objective, cfg=ExitLossConfig()))
        reference = [p.detach().float().clone() for p in pm.model.parameters()]
        per_rank = global_batch // dp
        for step in range(a.steps):
            base = step * global_batch + dp_rank * per_rank
            batches = []
            for m in range(per_rank // micro):
                items = [sample(base + m * micro + i, seq, vocab) for i in range(micro)]
                tokens, labels, mask = (torch.stack(x) for x in zip(*items))
                batches.append({"tokens": tokens, "labels": labels, "loss_mask": mask,
                                "position_ids": torch.arange(seq).expand(micro, -1)})
            train_step(pm, optimizer, scheduler, batches, forward_step, global_batch)
            teacher.update(pm, DECAY)
            ema_update_(reference, [p.detach().float() for p in pm.model.parameters()], DECAY)

        student_moved = any(not torch.equal(r, p.detach().float()) for r, p in zip(reference, pm.model.parameters()))
        weights_equal = all(torch.equal(t, r.to(t.dtype)) for t, r in zip(teacher.params, reference))
        state = checkpointed_state(teacher)
        names = [n for n, _ in pm.model.named_parameters()]
        # the checkpoint's ShardedTensors are this rank's (TP) pieces, keyed by parameter name
        by_name = dict(zip(names, reference))
        state_equal = all(torch.equal(state[name], by_name[name]) for name in names)
        flags = torch.tensor([student_moved, weights_equal, state_equal], dtype=torch.int)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        result.update(student_moved=bool(flags[0]), weights_equal_reference=bool(flags[1]),
                      checkpoint_state_equals_reference=bool(flags[2]))
        if a.save:
            checkpointing.save_checkpoint(a.save, a.steps, pm, optimizer, scheduler, {}, {},
                                          extra_models={"teacher": teacher.store})
        result["state"] = {k: v.tolist() for k, v in state.items()}
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump(result, f)
    parallel.destroy()


if __name__ == "__main__":
    main()
