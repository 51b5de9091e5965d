"""Our one door to megatron-core's ``dist_checkpointing``, the same on 0.16 and 0.17+.

Where the releases differ, this module asks megatron-core what it can do (a parameter in a
signature, a file a save left behind) rather than which version it is:

* 0.17+ keep the common (non-tensor) state as a ``ShardedObject`` inside the torch_dist shards
  and no longer write ``common.pt``; 0.16 reads only ``common.pt``. After a save, a missing
  ``common.pt`` is written from the common state the save stored, so every release we support
  reads every checkpoint we write. (0.17+ still read a ``common.pt`` first when there is one.)
* 0.17+ take ``async_strategy`` in ``dist_checkpointing.save`` and default it to NVIDIA
  Resiliency Extension's implementation; we always use megatron-core's own ("mcore"), which
  both releases have and which needs no extra package.
* torch.distributed.checkpoint's ``CheckpointException`` derives from ``BaseException``.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import multiprocessing
import os
import queue
from typing import Any, Callable, Dict, Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)

from megatron_looprpt.training.checkpointing.files import LEGACY_COMMON

try:
    from torch.distributed.checkpoint.api import CheckpointException as _DcpError

    LOAD_ERRORS = (Exception, _DcpError)
except ImportError:  # pragma: no cover - torch without torch.distributed.checkpoint
    LOAD_ERRORS = (Exception,)

_shared_results_queue = False
# the ShardedObject key megatron-core 0.17+ store the common state under
_COMMON_OBJECT = "common_state"


def prepare(async_save: bool = False) -> None:
    """Work around two megatron-core behaviours before a save or load (both releases).

    * The torch_dist writer calls ``filesystem_async._process_memory()`` (debug logging only)
      outside its error handling: without psutil that raises in a writer and the save fails
      or hangs. Without psutil, report 0 bytes instead.
    * The writer hands its results back through a queue of a *spawned* multiprocessing
      Manager, created on the first save of a process: a fresh interpreter that re-imports the
      main module (seconds) and is torn down at exit (seconds more). A synchronous save puts
      and gets the results in this very process, so a plain ``queue.Queue`` does. An async save
      writes in a forked child, which needs a queue shared across processes: a Manager forked
      from this process (no re-import).
    """
    global _shared_results_queue
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not getattr(filesystem_async, "HAVE_PSUTIL", True):
        filesystem_async._process_memory = lambda: 0
    if async_save and not _shared_results_queue:
        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()
        _shared_results_queue = True
    elif getattr(filesystem_async, "_results_queue", 0) is None:
        filesystem_async._results_queue = queue.Queue()


def save_strategy(parallel_group) -> FullyParallelSaveStrategyWrapper:
    """torch_dist, with the writing of replicated tensors spread over ``parallel_group`` (the
    data-parallel ranks) instead of all falling to its first rank."""
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), parallel_group)


def load_strategy(path: str, parallel_group) -> FullyParallelLoadStrategyWrapper:
    """Each replicated tensor is read from storage by one rank of ``parallel_group`` and
    broadcast to the others, instead of being read by all of them."""
    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(path), parallel_group)


def save(sharded: Dict[str, Any], directory: str, strategy, async_save: bool,
         preprocess_common: Callable[[Dict[str, Any]], Dict[str, Any]]):
    """``dist_checkpointing.save``; with ``async_save``, the request that writes the shards
    (to be scheduled on an ``AsyncQueue``), else None once everything is written."""
    prepare(async_save)
    kwargs = {}
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        kwargs["async_strategy"] = "mcore"
    return dist_checkpointing.save(sharded, directory, sharded_strategy=strategy,
                                   async_sharded_save=async_save,
                                   preprocess_common_before_consistancy_check=preprocess_common,
                                   **kwargs)


def load(sharded: Dict[str, Any], path: str, strategy=None, strict=None):
    prepare()
    kwargs = {} if strict is None else {"strict": strict}
    return dist_checkpointing.load(sharded, path, sharded_strategy=strategy, **kwargs)


class AsyncQueue:
    """megatron-core's queue of async saves, with forked (not persistent) writer processes:
    a persistent worker is a spawned interpreter kept for the whole run."""

    def __init__(self):
        self._calls = AsyncCallsQueue(persistent=False)

    def schedule(self, request) -> None:
        self._calls.schedule_async_request(request)

    def pending(self) -> int:
        return self._calls.get_num_unfinalized_calls()

    def finalize(self, blocking: bool) -> None:
        """Collective: run the finalize functions (on every rank) of the saves every rank has
        finished writing; ``blocking`` waits for all of them."""
        self._calls.maybe_finalize_async_calls(blocking=blocking)


def write_legacy_common(path: str) -> None:
    """Rank 0, after the save: give the checkpoint a ``common.pt`` if megatron-core did not
    write one, so that megatron-core 0.16 can read it. Both releases write that file with
    ``torch.save`` of the common state dict."""
    target = os.path.join(path, LEGACY_COMMON)
    if not os.path.exists(target):
        common = dist_checkpointing.load_common_state_dict(path)
        tmp = f"{target}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            torch.save(common, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)


def load_common(path: str) -> Dict[str, Any]:
    return dist_checkpointing.load_common_state_dict(path)


def load_tensors_metadata(path: str):
    return dist_checkpointing.load_tensors_metadata(path)


def unreadable_common_hint(path: str) -> Optional[str]:
    """Why this megatron-core cannot read ``path``'s common state when it is kept only inside
    the shards (megatron-core 0.17+'s format, without the ``common.pt`` we add), or None."""
    if os.path.exists(os.path.join(path, LEGACY_COMMON)):
        return None
    try:
        from torch.distributed.checkpoint import FileSystemReader

        stored = FileSystemReader(path).read_metadata().state_dict_metadata
    except LOAD_ERRORS:
        return None
    if not any(key.startswith(_COMMON_OBJECT) for key in stored):
        return None
    return (f"it keeps its common state only inside the shards, as megatron-core 0.17+ write it "
            f"without {LEGACY_COMMON}, which megatron-core {_installed_version()} cannot read: "
            f"load it with megatron-core 0.17+ (Python 3.12+), which also re-saves it with "
            f"{LEGACY_COMMON}")


def _installed_version() -> str:
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source checkout
        return "(version unknown)"
