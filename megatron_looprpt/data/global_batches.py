"""Global batches for the training loop, loaded while the previous step computes.

The DataLoader's worker processes build micro-batches and, on a GPU, its pin-memory thread puts
them in page-locked memory (``build_data_iterator``). On top of that a background thread here
collects the *next* global batch while the current step runs, so a step starts with its batch
in host memory instead of loading it first. Each micro-batch is copied to the device once, when
the step takes it (non-blocking from pinned memory); the loop chunks that read it later find it
there.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Iterator, List, Optional

import torch

from megatron_looprpt.device import to_device

Batch = Dict[str, torch.Tensor]


class _Fetch(threading.Thread):
    """One call of ``fetch`` in the background; ``get`` returns its result or raises its error.
    A daemon thread: a fetch still running when training ends (the batch after the last one)
    must not keep the process alive."""

    def __init__(self, fetch: Callable[[], List[Batch]]):
        super().__init__(daemon=True, name="global-batch-prefetch")
        self._fetch = fetch
        self._result: Optional[List[Batch]] = None
        self._error: Optional[BaseException] = None
        self.start()

    def run(self) -> None:
        try:
            self._result = self._fetch()
        except BaseException as error:  # re-raised in the consumer's thread by get()
            self._error = error

    def get(self) -> List[Batch]:
        self.join()
        if self._error is not None:
            raise self._error
        return self._result


class GlobalBatches:
    """Successive global batches (lists of ``num_microbatches`` micro-batches, on the device)
    from an iterator of host micro-batches, each fetched ahead of its use."""

    def __init__(self, micro_batches: Iterator[Batch], num_microbatches: int):
        self._micro_batches = micro_batches
        self._num_microbatches = num_microbatches
        self._next = _Fetch(self._collect)

    def _collect(self) -> List[Batch]:
        return [next(self._micro_batches) for _ in range(self._num_microbatches)]

    def next_global_batch(self) -> List[Batch]:
        host = self._next.get()
        self._next = _Fetch(self._collect)
        return [to_device(batch) for batch in host]
