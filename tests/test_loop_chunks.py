"""Per step, under PP=2 with T=4 loop chunks on each stage: each micro-batch is copied to the
device once (not once per chunk that reads it), and Transformer Engine is told to recast its
cached FP8 weights at the step's first call of the shared layers (every step, evaluation too)."""

import pytest

from tests.torchrun import run_json

_result = {}


def observations(tmp_path_factory):
    if "run" not in _result:
        out = tmp_path_factory.mktemp("chunks") / "run.json"
        _result["run"] = run_json("tests/harness/chunk_run.py", 2, ["--loops", "4"], out)
    return _result["run"]


@pytest.mark.slow
def test_one_host_to_device_copy_per_micro_batch(tmp_path_factory):
    for rank in observations(tmp_path_factory):
        for step in rank:
            assert step["copies"] == step["microbatches"] * step["tensors_per_microbatch"], step


@pytest.mark.slow
def test_fp8_weight_cache_is_refreshed_at_every_step_first_call(tmp_path_factory):
    for rank in observations(tmp_path_factory):
        for step in rank:
            calls = step["first_layer_calls"]
            # the stage's first layer runs once per chunk per micro-batch
            assert len(calls) == 4 * step["microbatches"]
            assert calls[0] is True and not any(calls[1:]), step
