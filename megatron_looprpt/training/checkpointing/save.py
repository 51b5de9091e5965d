"""Writing checkpoints: a temp directory per save, published by one rename, synchronously or
while training goes on.

A save (collective) writes into ``save_dir/.tmp_iter_XXXXXXX_<unique>``. Once every rank's shards
are written and fsynced, rank 0 renames the directory to ``iter_XXXXXXX`` and then replaces the
tracker (temp file, fsync, ``os.replace``). A process killed at any point leaves the previous
checkpoint and tracker as they were; the half-written temp directory is ignored by loads and
removed by the next save. Checkpoints beyond ``keep`` are removed after the publish, outside
every barrier (``files.Retention``).

With ``async_save`` the shards are written by a forked process (megatron-core's async save)
while training continues; the publish runs when every rank's writer has finished, at the next
``poll()`` (the loop calls it every iteration), ``save()`` or ``finish()``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from typing import Any, Dict, Optional

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_looprpt.training.checkpointing import files, megatron_io, optimizer_state
from megatron_looprpt.training.checkpointing.meta import check_extra_models, checkpoint_meta
from megatron_looprpt.training.checkpointing.rng import (
    RNG_KEY,
    current_layout,
    get_rng_state,
    rng_sharded_object,
)

logger = logging.getLogger(__name__)


class Checkpointer:
    """Saves the checkpoints of one run into ``save_dir`` (every method is collective).

    ``keep``: keep only the newest ``keep`` checkpoints. ``async_save``: write in the background;
    call ``poll()`` once per iteration and ``finish()`` before the process ends (an unfinished
    save is never published, and the checkpoints before it stay as they were).
    """

    def __init__(self, save_dir: str, keep: Optional[int] = None, async_save: bool = False):
        self.save_dir = os.path.abspath(save_dir)
        self.async_save = async_save
        self._retention = files.Retention(self.save_dir, keep)
        self._queue = megatron_io.AsyncQueue() if async_save else None
        self.published: Optional[int] = None  # the iteration of the last checkpoint published

    def save(self, iteration: int, pm, optimizer, scheduler, state: Dict[str, Any],
             args: Dict[str, Any], extra_models: Optional[Dict[str, Any]] = None) -> str:
        """Save iteration ``iteration`` to ``save_dir/iter_{iteration:07d}``; returns that path.

        ``state``: the caller's resumable state (consumed samples, data position, ...; JSON-able,
        rank 0's copy is kept). ``state['no_optim']`` skips the optimizer. ``args``: the run's
        arguments (JSON-able), readable later with ``read_checkpoint_args``. ``extra_models``:
        name -> module with ``sharded_state_dict`` (e.g. an EMA teacher, sharded like the
        student); saved under ``<name>.`` keys, so they reshard like the model.
        """
        extra_models = check_extra_models(extra_models)
        state = dict(state or {})
        self._finish_pending()
        # with the parameter all-gather overlapped, a step leaves the other ranks' shards of the
        # new weights on their ranks until the next forward pass
        pm.sync_params()
        model_sd = pm.model.sharded_state_dict()
        sharded = {"model": model_sd, RNG_KEY: rng_sharded_object(get_rng_state())}
        optim_meta = None
        if optimizer is not None and not state.get("no_optim"):
            optim_meta = optimizer_state.optimizer_metadata(optimizer)
            optimizer_state.prime(optimizer)
            sharded["optimizer"] = optimizer_state.sharded_state(optimizer, model_sd, is_loading=False)
        for name, module in extra_models.items():
            sharded[name] = module.sharded_state_dict(prefix=f"{name}.")
        if scheduler is not None:
            sharded["scheduler"] = scheduler.state_dict()
        meta = checkpoint_meta(iteration, current_layout(), args, state=state, optimizer=optim_meta,
                               extra_models=sorted(extra_models))
        strategy = megatron_io.save_strategy(
            parallel_state.get_data_parallel_group(with_context_parallel=True))
        return self.write(iteration, sharded, meta, strategy, self.async_save)

    def write(self, iteration: int, sharded: Dict[str, Any], meta: Dict[str, Any], strategy,
              async_save: bool = False) -> str:
        """Write ``sharded`` (+ ``meta`` as its ``looprpt`` entry) with megatron-core's save
        ``strategy`` and publish it atomically."""
        self._finish_pending()
        started = time.time()
        rank = dist.get_rank()
        final = files.checkpoint_dir(self.save_dir, iteration)
        unique = None
        if rank == 0:
            os.makedirs(self.save_dir, exist_ok=True)
            files.clean_stale(self.save_dir)
            unique = f"{int(time.time())}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        unique = _broadcast_from_rank0(unique)
        tmp = os.path.join(self.save_dir, f"{files.TMP_PREFIX}{iteration:07d}_{unique}")
        if rank == 0:
            os.makedirs(tmp)
        dist.barrier()

        request = megatron_io.save({**sharded, "looprpt": meta}, tmp, strategy, async_save,
                                   optimizer_state.common_for_consistency_check)
        publish = functools.partial(self._publish, tmp, final, iteration, unique, started)
        if request is None:
            publish()
        else:
            request.add_finalize_fn(publish)
            self._queue.schedule(request)
            logger.info("scheduled the background save of %s (%.2fs in training)", final,
                        time.time() - started)
        return final

    def poll(self) -> None:
        """Publish a background save whose writers have all finished; returns at once otherwise."""
        if self._queue is not None:
            self._queue.finalize(blocking=False)

    def finish(self) -> None:
        """Wait for a background save and publish it, and for old checkpoints to be removed."""
        self._finish_pending()
        self._retention.wait()

    def pending(self) -> bool:
        return self._queue is not None and self._queue.pending() > 0

    def _finish_pending(self) -> None:
        if self._queue is not None:
            self._queue.finalize(blocking=True)

    def _publish(self, tmp: str, final: str, iteration: int, unique: str, started: float) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        if rank == 0:
            megatron_io.write_legacy_common(tmp)
        files.fsync_tree(tmp, rank, world)
        dist.barrier()
        if rank == 0:
            files.publish(tmp, final, unique)
            files.write_tracker(self.save_dir, iteration)
            logger.info("saved checkpoint %s in %.2fs", final, time.time() - started)
        dist.barrier()
        self.published = iteration
        if rank == 0:
            self._retention.apply(iteration, unique)


def save_checkpoint(save_dir: str, iteration: int, pm, optimizer, scheduler, state: Dict[str, Any],
                    args: Dict[str, Any], keep: Optional[int] = None,
                    extra_models: Optional[Dict[str, Any]] = None) -> str:
    """One synchronous save (see ``Checkpointer.save``); returns the checkpoint directory."""
    checkpointer = Checkpointer(save_dir, keep=keep)
    path = checkpointer.save(iteration, pm, optimizer, scheduler, state, args, extra_models)
    checkpointer.finish()
    return path


def write_checkpoint(save_dir: str, iteration: int, sharded: Dict[str, Any], meta: Dict[str, Any],
                     sharded_strategy) -> str:
    """Write a prepared ``sharded`` state (the converter's, with its own megatron-core save
    strategy) as iteration ``iteration`` of ``save_dir``, published atomically."""
    return Checkpointer(save_dir).write(iteration, sharded, meta, sharded_strategy)


def _broadcast_from_rank0(value):
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
