"""The checkpoint directory on disk: names, the tracker, completeness, atomic publishing, retention.

Nothing here talks to megatron-core or to other ranks; the callers decide which rank acts.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from typing import List, Optional, Tuple

logger = logging.getLogger(__name__)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
# megatron-core writes metadata.json after every shard; torch.distributed.checkpoint writes
# .metadata (its index of the shards) when the shards are finished. megatron-core 0.16 also
# writes common.pt; 0.17+ keep the common state inside the shards (see megatron_io).
_MEGATRON_CONFIG = "metadata.json"
_DCP_INDEX = ".metadata"
LEGACY_COMMON = "common.pt"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
TMP_PREFIX = ".tmp_iter_"
ASIDE_PREFIX = ".old_iter_"
TRASH_PREFIX = ".trash_iter_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line and names the path."""


def checkpoint_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def tracker_path(save_dir: str) -> str:
    return os.path.join(save_dir, TRACKER_FILENAME)


def iteration_of(path: str) -> Optional[int]:
    match = _ITER_RE.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def is_complete(path: str) -> bool:
    """A directory megatron-core finished writing (both of its last-written files are there)."""
    return (os.path.isfile(os.path.join(path, _MEGATRON_CONFIG))
            and os.path.isfile(os.path.join(path, _DCP_INDEX)))


def _is_checkpoint_itself(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name))
               for name in (_MEGATRON_CONFIG, _DCP_INDEX, LEGACY_COMMON))


def list_iterations(save_dir: str) -> List[int]:
    """Iterations of the published ``iter_*`` directories, ascending (temp dirs excluded)."""
    if not os.path.isdir(save_dir):
        return []
    found = []
    for name in os.listdir(save_dir):
        match = _ITER_RE.match(name)
        if match and os.path.isdir(os.path.join(save_dir, name)):
            found.append(int(match.group(1)))
    return sorted(found)


def previous_hint(save_dir: str, iteration: Optional[int]) -> str:
    """What to do instead of using a broken checkpoint: the newest complete one before it."""
    older = [it for it in list_iterations(save_dir)
             if (iteration is None or it < iteration) and is_complete(checkpoint_dir(save_dir, it))]
    if not older:
        return "no earlier complete checkpoint exists in " + save_dir
    prev = checkpoint_dir(save_dir, older[-1])
    return (f"the previous complete checkpoint is iteration {older[-1]} ({prev}): load it directly "
            f"or write {older[-1]} into {tracker_path(save_dir)}")


def read_tracker(save_dir: str) -> Optional[int]:
    path = tracker_path(save_dir)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(
            f"checkpoint tracker {path} is corrupt (holds {text[:40]!r}, expected an iteration "
            f"number); {previous_hint(save_dir, None)}") from None


def write_tracker(save_dir: str, iteration: int) -> None:
    final = tracker_path(save_dir)
    tmp = f"{final}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_path(save_dir, directory=True)


def resolve_checkpoint(load_dir: str) -> Optional[Tuple[str, Optional[int]]]:
    """(checkpoint directory, iteration) to load from ``load_dir``, or None if it holds none.

    ``load_dir`` is a save directory (its tracker is followed; without one, the newest complete
    ``iter_*`` directory is used) or one checkpoint directory itself. Raises ``CheckpointError``
    when the tracker points to a missing or incomplete directory.
    """
    if not load_dir or not os.path.isdir(load_dir):
        return None
    if _is_checkpoint_itself(load_dir):
        path = os.path.normpath(load_dir)
        if not is_complete(path):
            raise CheckpointError(
                f"checkpoint {path} is incomplete or corrupt (no {_MEGATRON_CONFIG} or {_DCP_INDEX}); "
                f"{previous_hint(os.path.dirname(path), iteration_of(path))}")
        return path, iteration_of(path)
    iteration = read_tracker(load_dir)
    if iteration is None:
        complete = [it for it in list_iterations(load_dir) if is_complete(checkpoint_dir(load_dir, it))]
        if not complete:
            if list_iterations(load_dir):
                raise CheckpointError(
                    f"{load_dir} has iter_* directories but none is complete and there is no "
                    f"{TRACKER_FILENAME}")
            return None
        logger.warning("no %s in %s; loading the newest complete checkpoint, iteration %d",
                       TRACKER_FILENAME, load_dir, complete[-1])
        iteration = complete[-1]
    path = checkpoint_dir(load_dir, iteration)
    if not os.path.isdir(path):
        aside = _aside_copy(load_dir, iteration)
        if aside is not None:
            # A save of the same iteration was killed between moving the old copy aside and
            # renaming the new one into place; the old copy is complete and still valid.
            logger.warning("%s is missing; using its complete copy %s", path, aside)
            return aside, iteration
        raise CheckpointError(
            f"checkpoint tracker {tracker_path(load_dir)} points to iteration {iteration} but "
            f"{path} does not exist; {previous_hint(load_dir, iteration)}")
    if not is_complete(path):
        raise CheckpointError(
            f"checkpoint {path} is incomplete or corrupt (missing {_MEGATRON_CONFIG} or {_DCP_INDEX}); "
            f"{previous_hint(load_dir, iteration)}")
    return path, iteration


def _aside_copy(save_dir: str, iteration: int) -> Optional[str]:
    prefix = f"{ASIDE_PREFIX}{iteration:07d}_"
    for name in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, name)
        if name.startswith(prefix) and os.path.isdir(path) and is_complete(path):
            return path
    return None


def fsync_path(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str, rank: int, world: int) -> None:
    """Make the checkpoint durable before it is published; ranks share the files."""
    files, dirs = [], []
    for here, _, names in os.walk(root):
        dirs.append(here)
        files.extend(os.path.join(here, n) for n in names)
    for path in sorted(files)[rank::world]:
        fsync_path(path)
    if rank == 0:
        for path in dirs:
            fsync_path(path, directory=True)


def clean_stale(save_dir: str) -> None:
    """Before a save: drop what killed saves and killed removals left behind."""
    for name in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, name)
        if name.startswith(ASIDE_PREFIX) and os.path.isdir(path):
            match = re.match(rf"^{re.escape(ASIDE_PREFIX)}(\d+)_", name)
            final = checkpoint_dir(save_dir, int(match.group(1))) if match else None
            if final and not os.path.exists(final) and is_complete(path):
                # killed between moving the old copy aside and publishing the new one: the old
                # copy is what the tracker means, put it back
                logger.warning("restoring %s from %s", final, path)
                os.rename(path, final)
            else:
                shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(TMP_PREFIX) and os.path.isdir(path):
            logger.warning("removing incomplete checkpoint %s left by an interrupted save", path)
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(TRASH_PREFIX) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(TRACKER_FILENAME + ".tmp"):
            os.remove(path)


def publish(tmp: str, final: str, unique: str) -> None:
    """Move the finished temp directory to its final name. A directory already there (the same
    iteration saved again) is moved aside first and removed only once the new one is in place."""
    aside = None
    if os.path.exists(final):
        aside = os.path.join(os.path.dirname(final),
                             f"{ASIDE_PREFIX}{os.path.basename(final)[len('iter_'):]}_{unique}")
        os.rename(final, aside)
    os.rename(tmp, final)
    fsync_path(os.path.dirname(final), directory=True)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


class Retention:
    """Keeps the newest ``keep`` checkpoints. Older ones are renamed out of the ``iter_*``
    namespace at once (so a reader never meets half of one) and deleted by a background thread,
    so no rank waits for a large directory to be removed; a removal cut short by the end of the
    process leaves a ``.trash_iter_*`` directory that the next save deletes."""

    def __init__(self, save_dir: str, keep: Optional[int]):
        if keep is not None and keep < 1:
            raise ValueError("keep must be >= 1")
        self.save_dir, self.keep = save_dir, keep
        self._thread: Optional[threading.Thread] = None

    def apply(self, iteration: int, unique: str) -> None:
        """After ``iteration`` was published: retire checkpoints beyond the newest ``keep`` at or
        below it. Iterations above it (an abandoned later run) are left alone."""
        if self.keep is None:
            return
        older = [it for it in list_iterations(self.save_dir) if it < iteration]
        trash = []
        for it in older[: max(0, len(older) - (self.keep - 1))]:
            target = os.path.join(self.save_dir, f"{TRASH_PREFIX}{it:07d}_{unique}")
            os.rename(checkpoint_dir(self.save_dir, it), target)
            trash.append(target)
        if trash:
            self.wait()
            self._thread = threading.Thread(target=_remove_all, args=(trash,), daemon=True,
                                            name="checkpoint-retention")
            self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _remove_all(paths: List[str]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
