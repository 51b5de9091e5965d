"""Train a tiny looped model under a given layout with checkpoint save / resume; dump per-step
metrics (used by tests/test_checkpointing.py; run with torchrun, any world size).

Batches are a fixed, seeded function of the global sample index (as in layout_run.py), so a run
resumed at iteration k sees exactly the batches an uninterrupted run sees after step k.

  --steps N          train until iteration N (from 0, or from the loaded iteration)
  --save DIR         save into DIR after the iterations listed in --save-at (and on SIGTERM)
  --load DIR         resume from DIR if it holds a checkpoint
  --save-on-load     save right after loading (same iteration), e.g. to compare reshards
  --pause-in-save S  after the shards are written but before publishing, touch
                     DIR/../pause_marker and sleep S seconds (for the kill -9 test)
  --async-save       write the --save checkpoints in the background (Checkpointer.poll every step)
  --writer-delay S   the background writer sleeps S seconds before writing (shows training
                     going on meanwhile; gives a kill -9 time to land mid-write); with
                     --pid-dir it writes DIR/writer{r}.pid first
  --sigterm          install ExitSignals (SIGTERM, SIGINT, SIGUSR1); on a signal save and exit 0
  --pid-dir DIR      write DIR/rank{r}.pid once training started (for signalling)
  --step-sleep S     sleep S seconds after every step (gives a signal time to arrive)
  --teacher          checkpoint a second model as extra_models['teacher']
  --forbid-gather    fail if the distributed optimizer's state is gathered onto one rank
  --measure-load     report the optimizer elements each rank asks the load for

Output JSON (rank 0): {"records": [{"iteration", "loss", "grad_norm", "lr", "probe",
"published"}...], "start_iteration", "end_iteration", "interrupted", "loaded": {...} or null,
"signal": the signal number that stopped the run or null, "load_requests": per rank, the
optimizer elements (--measure-load) and the elements the rank's optimizer shard holds}.
"""

from megatron_looprpt.deferred_compile import defer_megatron_compiles

defer_megatron_compiles()  # before megatron-core is imported: a faster start

import argparse
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import asdict
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_looprpt import parallel
from megatron_looprpt.models.builder import LoopedModelConfig, build_model
from megatron_looprpt.models.loss import ExitLossConfig
from megatron_looprpt.training import checkpointing
from megatron_looprpt.training.objectives import lm_objective
from megatron_looprpt.training.setup import OptimConfig, build_optimizer
from megatron_looprpt.schedule import make_forward_step, train_step


def sample(index: int, seq: int, vocab: int):
    g = torch.Generator().manual_seed(1000 + index)
    tokens = torch.randint(0, vocab, (seq + 1,), generator=g)
    mask = torch.ones(seq)
    mask[: index % 3] = 0.0
    return tokens[:-1], tokens[1:], mask


def rng_probe():
    """Draw from every generator the checkpoint restores (same on a resumed run only if the
    RNG states were restored)."""
    with get_cuda_rng_tracker().fork():
        tracked = torch.rand(1).item()
    return [random.random(), float(np.random.rand()), torch.rand(1).item(), tracked]


def install_pause(seconds: float, marker: str):
    """Pause between writing the shards and publishing the checkpoint."""
    original = checkpointing.Checkpointer._publish

    def slow_publish(self, tmp, *args, **kwargs):
        dist.barrier()
        if dist.get_rank() == 0:
            with open(marker, "w") as f:
                f.write(tmp)
        time.sleep(seconds)
        return original(self, tmp, *args, **kwargs)

    checkpointing.Checkpointer._publish = slow_publish


def install_writer_delay(seconds: float, pid_dir=None):
    """The forked background writer sleeps before it writes (having written
    ``pid_dir/writer{rank}.pid``, if given)."""
    from megatron.core.dist_checkpointing.strategies.async_utils import TemporalAsyncCaller

    original = TemporalAsyncCaller.schedule_async_call
    rank = dist.get_rank()

    def delayed(self, request):
        write = request.async_fn

        def late_write(*args, **kwargs):
            if pid_dir:
                with open(os.path.join(pid_dir, f"writer{rank}.pid"), "w") as f:
                    f.write(str(os.getpid()))
            time.sleep(seconds)
            return write(*args, **kwargs)

        return original(self, request._replace(async_fn=late_write) if write is not None else request)

    TemporalAsyncCaller.schedule_async_call = delayed


def forbid_gather():
    """megatron-core's gather of every DP shard onto one rank (its fully_reshardable writer and
    reader) raises."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    def refuse(self, *args, **kwargs):
        raise AssertionError("the distributed optimizer's state was gathered onto one rank")

    DistributedOptimizer.get_parameter_state_dp_zero = refuse


def measure_load(requests: list):
    """Record how many optimizer elements each load asks for on this rank."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    original = dist_checkpointing.load

    def counting_load(sharded, *args, **kwargs):
        requests.append(sum(t.data.numel() if t.data is not None else int(np.prod(t.local_shape))
                            for t in nested_values(sharded.get("optimizer", {}))
                            if isinstance(t, ShardedTensor)))
        return original(sharded, *args, **kwargs)

    dist_checkpointing.load = counting_load


def owned_optimizer_numel(optimizer) -> int:
    """Elements of main params and Adam moments this rank's distributed optimizer holds."""
    return sum(3 * p.numel() for opt in getattr(optimizer, "chained_optimizers", [optimizer])
               for group in opt.optimizer.param_groups for p in group["params"])


SEQ, VOCAB = 16, 256


def build(tp=1, pp=1, loops=2, dist_opt=False, global_batch=8):
    """The tiny model, optimizer and schedule every run of this harness trains."""
    cfg = LoopedModelConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
        vocab_size=VOCAB, max_position_embeddings=64, loop_steps=loops, tensor_parallel=tp,
        pipeline_parallel=pp, make_vocab_size_divisible_by=64,
        untie_embeddings_and_output_weights=True,
    )
    pm = build_model(cfg, seed=11, use_distributed_optimizer=dist_opt)
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, lr_warmup_iters=1, lr_decay_iters=10,
                        global_batch_size=global_batch, use_distributed_optimizer=dist_opt)
    optimizer, scheduler = build_optimizer(pm, cfg, optim)
    forward_step = make_forward_step(partial(lm_objective, cfg=ExitLossConfig(entropy_coef=0.05)))
    return cfg, optim, pm, optimizer, scheduler, forward_step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--loops", type=int, default=2)
    p.add_argument("--dist-opt", action="store_true")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--save")
    p.add_argument("--save-at", type=int, nargs="*", default=[])
    p.add_argument("--keep", type=int)
    p.add_argument("--load")
    p.add_argument("--no-load-optim", action="store_true")
    p.add_argument("--no-load-rng", action="store_true")
    p.add_argument("--save-on-load")
    p.add_argument("--pause-in-save", type=float, default=0.0)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--writer-delay", type=float, default=0.0)
    p.add_argument("--forbid-gather", action="store_true")
    p.add_argument("--measure-load", action="store_true")
    p.add_argument("--sigterm", action="store_true")
    p.add_argument("--pid-dir")
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--teacher", action="store_true",
                   help="also checkpoint a second, never-trained model as extra_models['teacher'] "
                        "(built from another seed when loading, so only a load makes it equal)")
    p.add_argument("--out", required=True)
    a = p.parse_args()

    parallel.initialize(a.tp, a.pp, seed=7)
    random.seed(5)
    np.random.seed(6)
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    cfg, optim, pm, optimizer, scheduler, forward_step = build(a.tp, a.pp, a.loops, a.dist_opt,
                                                               a.global_batch)
    extra = {}
    if a.teacher:
        extra["teacher"] = build_model(cfg, seed=99 if a.load else 13, wrap_ddp=False).model
    run_args = {"model": asdict(cfg), "optim": asdict(optim), "harness": vars(a)}
    if a.pause_in_save and a.save:
        install_pause(a.pause_in_save, os.path.join(os.path.dirname(os.path.abspath(a.save)),
                                                    "pause_marker"))
    if a.writer_delay:
        install_writer_delay(a.writer_delay, a.pid_dir)
    if a.forbid_gather:
        forbid_gather()
    load_requests = []
    if a.measure_load:
        measure_load(load_requests)

    iteration, consumed, loaded_info = 0, 0, None
    if a.load:
        loaded = checkpointing.load_checkpoint(a.load, pm, optimizer, scheduler,
                                               load_optim=not a.no_load_optim,
                                               load_rng=not a.no_load_rng, extra_models=extra)
        if loaded is not None:
            iteration = loaded.iteration
            consumed = loaded.state["consumed_samples"]
            assert loaded.args["model"]["num_layers"] == cfg.num_layers
            loaded_info = {"iteration": loaded.iteration, "optimizer": loaded.optimizer_loaded,
                           "rng": loaded.rng_loaded, "layout": loaded.saved_layout,
                           "state": loaded.state, "extra_models": loaded.extra_models}
            if a.save_on_load:
                checkpointing.save_checkpoint(a.save_on_load, iteration, pm, optimizer, scheduler,
                                              {"consumed_samples": consumed}, run_args,
                                              extra_models=extra)

    checkpointer = checkpointing.Checkpointer(a.save, keep=a.keep, async_save=a.async_save) if a.save else None

    def save():
        checkpointer.save(iteration, pm, optimizer, scheduler,
                          {"consumed_samples": consumed, "iteration": iteration}, run_args,
                          extra_models=extra)

    per_rank = a.global_batch // dp
    records, interrupted = [], False
    start_iteration = iteration
    handler = checkpointing.ExitSignals() if a.sigterm else contextlib.nullcontext()
    with handler as signals:
        if a.pid_dir:
            with open(os.path.join(a.pid_dir, f"rank{dist.get_rank()}.pid"), "w") as f:
                f.write(str(os.getpid()))
        while iteration < a.steps:
            base = consumed + dp_rank * per_rank
            batches = []
            for m in range(per_rank // a.micro_batch):
                items = [sample(base + m * a.micro_batch + i, SEQ, VOCAB) for i in range(a.micro_batch)]
                tokens, labels, mask = (torch.stack(x) for x in zip(*items))
                batches.append({"tokens": tokens, "labels": labels, "loss_mask": mask,
                                "position_ids": torch.arange(SEQ).expand(a.micro_batch, -1)})
            metrics = train_step(pm, optimizer, scheduler, batches, forward_step, a.global_batch)
            iteration += 1
            consumed += a.global_batch
            n = metrics["num_tokens"].item()
            # "published": the newest checkpoint published before this iteration's save
            records.append({"iteration": iteration, "loss": metrics["lm_loss"].item() / n,
                            "grad_norm": metrics["grad_norm"].item(), "lr": metrics["lr"].item(),
                            "probe": rng_probe(),
                            "published": checkpointer.published if checkpointer else None})
            if a.step_sleep:
                time.sleep(a.step_sleep)
            if a.save and iteration in a.save_at:
                save()
            if checkpointer is not None:
                checkpointer.poll()
            if a.sigterm and signals.received():
                if a.save and iteration not in a.save_at:
                    save()
                interrupted = True
                break
    if checkpointer is not None:
        checkpointer.finish()
    signal_number = signals.signal_number if a.sigterm else None
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"requested": load_requests, "owned": owned_optimizer_numel(optimizer),
                                      "signal": signal_number})
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump({"records": records, "start_iteration": start_iteration,
                       "end_iteration": iteration, "interrupted": interrupted,
                       "loaded": loaded_info, "signal": next((e["signal"] for e in everyone if e["signal"]), None),
                       "load_requests": everyone}, f)
    parallel.destroy()


if __name__ == "__main__":
    sys.exit(main())
