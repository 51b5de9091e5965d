"""Distributed checkpoints: save (synchronously or in the background), resume under any
TP/PP/DP layout, and exit cleanly on SIGTERM / SIGUSR1. ``docs/checkpointing.md`` describes the
format and its guarantees.

A checkpoint is one megatron-core ``dist_checkpointing`` (torch_dist) directory per iteration::

    save_dir/
      latest_checkpointed_iteration.txt     the iteration to resume from (the tracker)
      iter_0000200/                         metadata.json, .metadata, common.pt, *.distcp shards
      iter_0000400/

What is in it, and what survives a change of layout:

* ``model``: ``pm.model.sharded_state_dict()`` of every pipeline stage, as global tensors
  (layer index as an axis): any TP/PP/DP layout with the same model shape loads it.
* ``optimizer``: reshards like the model (``optimizer_state``). A checkpoint saved with one kind
  of optimizer (plain or distributed) cannot restore the other kind: that load fails with a
  one-line error, or skips the optimizer with ``load_optim=False``.
* ``rng``: python, numpy, torch CPU (+CUDA) and megatron's model-parallel tracker states, one
  ``ShardedObject`` per (pp, tp, dp) rank, restored only under the same layout. A model-only
  checkpoint (``has_rng`` false: the converter's) has none.
* ``extra_models`` (name -> module, e.g. the EMA teacher): under ``<name>.`` keys; they reshard
  like the model.
* common state: the scheduler's state, the caller's ``state`` and ``args`` (normalised through
  JSON so that they load with ``torch.load(weights_only=True)``), the layout and the iteration.

Loading tolerates a checkpoint without the layers' ``_extra_state`` objects (a converted
checkpoint: Transformer Engine's FP8 metadata then starts fresh); any other absent entry is an
error.

Modules: ``files`` (the directory, tracker, atomic publish, retention), ``save``, ``load``,
``optimizer_state``, ``rng``, ``meta`` (the common state), ``signals``, and ``megatron_io``
(everything that differs between megatron-core releases).
"""

from megatron_looprpt.training.checkpointing.files import (
    TRACKER_FILENAME,
    CheckpointError,
    checkpoint_dir,
    is_complete,
    list_iterations,
    resolve_checkpoint,
    tracker_path,
)
from megatron_looprpt.training.checkpointing.load import LoadedCheckpoint, load_checkpoint
from megatron_looprpt.training.checkpointing.meta import (
    checkpoint_meta,
    read_checkpoint_args,
    read_checkpoint_info,
)
from megatron_looprpt.training.checkpointing.rng import current_layout, get_rng_state, set_rng_state
from megatron_looprpt.training.checkpointing.save import Checkpointer, save_checkpoint, write_checkpoint
from megatron_looprpt.training.checkpointing.signals import ExitSignals

__all__ = [
    "TRACKER_FILENAME", "CheckpointError", "checkpoint_dir", "is_complete", "list_iterations",
    "resolve_checkpoint", "tracker_path", "LoadedCheckpoint", "load_checkpoint", "checkpoint_meta",
    "read_checkpoint_args", "read_checkpoint_info", "current_layout", "get_rng_state",
    "set_rng_state", "Checkpointer", "save_checkpoint", "write_checkpoint", "ExitSignals",
]
