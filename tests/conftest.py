import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megatron_looprpt.deferred_compile import defer_megatron_compiles  # noqa: E402

defer_megatron_compiles()  # as the entry points do, before any test imports megatron-core


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts several real processes (torchrun); still runs in CI")


@pytest.fixture
def single_process_parallel():
    """One gloo process with TP=PP=1. Initialised per test (a no-op when it already is): an
    in-process tool run by an earlier test may have torn the groups down."""
    from megatron_looprpt import parallel

    parallel.initialize(1, 1, seed=1)
    yield
