"""The training loop's input pipeline: the next global batch is loaded while the current step
runs, in the sampler's order; data-loader workers change nothing but who builds the batches."""

import threading

import pytest
import torch

from megatron_looprpt.data.datasets import build_data_iterator
from megatron_looprpt.data.global_batches import GlobalBatches


class _Source:
    """Micro-batches 0, 1, ... (``limit`` of them); records how many were asked for."""

    def __init__(self, limit=None, fail_at=None):
        self.asked, self.limit, self.fail_at = 0, limit, fail_at
        self.reached = threading.Condition()

    def __iter__(self):
        return self

    def __next__(self):
        with self.reached:
            if self.asked == self.fail_at:
                raise OSError("disk gone")
            if self.asked == self.limit:
                raise StopIteration
            self.asked += 1
            self.reached.notify_all()
            return {"tokens": torch.tensor([self.asked - 1])}

    def wait_for(self, count, timeout=10.0):
        with self.reached:
            return self.reached.wait_for(lambda: self.asked >= count, timeout)


def _ids(global_batch):
    return [int(batch["tokens"]) for batch in global_batch]


def test_the_next_global_batch_loads_while_the_step_runs():
    source = _Source()
    batches = GlobalBatches(source, num_microbatches=3)
    assert source.wait_for(3)                   # the first one, before anyone asked
    assert _ids(batches.next_global_batch()) == [0, 1, 2]
    # the step runs now; nobody asks for the next batch, yet it is being loaded
    assert source.wait_for(6)
    assert _ids(batches.next_global_batch()) == [3, 4, 5]
    assert source.wait_for(9)
    assert source.asked == 9                    # one global batch ahead, not more


def test_the_end_of_the_data_and_loading_errors_surface_at_the_step_that_needs_them():
    batches = GlobalBatches(_Source(limit=4), num_microbatches=2)
    assert _ids(batches.next_global_batch()) == [0, 1]
    assert _ids(batches.next_global_batch()) == [2, 3]
    with pytest.raises(StopIteration):
        batches.next_global_batch()
    batches = GlobalBatches(_Source(fail_at=3), num_microbatches=2)
    assert _ids(batches.next_global_batch()) == [0, 1]
    with pytest.raises(OSError, match="disk gone"):
        batches.next_global_batch()


class _Documents(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(index)
        tokens = torch.randint(0, 100, (9,), generator=g)
        return {"tokens": tokens[:-1], "labels": tokens[1:]}


@pytest.mark.parametrize("dp_rank", [0, 1])
def test_workers_build_the_same_micro_batches_in_the_same_order(dp_rank):
    def take(num_workers):
        iterator = build_data_iterator(_Documents(), 2, dp_rank, 2, consumed_samples=4, num_workers=num_workers)
        return list(iterator)

    alone, with_workers = take(0), take(2)
    assert len(alone) == len(with_workers) == 9
    for a, b in zip(alone, with_workers):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
