"""DDP's overlapped gradient reduction and parameter gather give the run without overlap: the
same losses, gradients and weights, with weights used T times (loop steps) under DP=2."""

import pytest

from tests.test_cli import corpus, flags, launch, records  # noqa: F401  (corpus: a fixture)
from tests.torchrun import run_json


def _runs(tmp_path, nproc, flags):
    off = run_json("tests/harness/overlap_run.py", nproc, flags, tmp_path / "off.json")
    on = run_json("tests/harness/overlap_run.py", nproc, [*flags, "--overlap"], tmp_path / "on.json")
    return off, on


def _overlap_happened(off, on):
    # small buckets, and from the second step on megatron started their reductions from the
    # backward hooks (the first step records how often each parameter's hook fires)
    assert on["bucket_groups"] > 1
    for rank in on["ranks"]:
        assert rank[0]["started_in_backward"] == 0
        assert all(step["started_in_backward"] >= 1 for step in rank[1:])
    assert all(step["started_in_backward"] == 0 for rank in off["ranks"] for step in rank)


@pytest.mark.slow
def test_overlapped_reduction_under_the_looped_pipeline_equals_the_reduction_at_the_end(tmp_path):
    # PP=2 x DP=2, T=4: every loop chunk's backward is its own backward call, so a weight's
    # gradient-ready hook fires T times in the last micro-batch; reducing a bucket at its
    # first completion would drop T-1 loop steps of it
    off, on = _runs(tmp_path, 4, ["--pp", "2", "--loops", "4"])
    _overlap_happened(off, on)
    for rank_off, rank_on in zip(off["ranks"], on["ranks"]):
        for a, b in zip(rank_off, rank_on):
            # a sum of two ranks' values is exact whatever the buckets: bit-equal
            assert (a["loss"], a["grad_norm"], a["grads"], a["params"]) == \
                   (b["loss"], b["grad_norm"], b["grads"], b["params"])
    assert off["ranks"][0][0]["loss"] != off["ranks"][0][-1]["loss"]


@pytest.mark.slow
def test_overlapped_reduce_scatter_and_parameter_gather_equal_the_synchronous_ones(tmp_path):
    # distributed optimizer, DP=2, T=4: overlap also defers each step's parameter all-gather
    # into the next forward pass. Which slice of the gradients a rank holds depends on the
    # buckets, and with it the order of the grad norm's partial sums: round-off through the
    # clipping factor (a parameter checksum that nearly cancels moves by ~1e-9), not
    # bit-equality. One step's update moves each of them by 1e-6 or more.
    off, on = _runs(tmp_path, 2, ["--dist-opt", "--loops", "4"])
    _overlap_happened(off, on)
    for rank_off, rank_on in zip(off["ranks"], on["ranks"]):
        for a, b in zip(rank_off, rank_on):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
            assert a["params"] == pytest.approx(b["params"], rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_resume_with_the_parameter_gather_overlapped_reproduces_the_uninterrupted_run(corpus, tmp_path):
    # DP=2 with the distributed optimizer: the overlapped gather is on by default, so after a
    # step each rank holds only its own shard of the new weights until the next forward pass;
    # a checkpoint saved then must wait for the rest (PipelinedModel.sync_params)
    common = ["--use-distributed-optimizer", "--ddp-bucket-size", "20000"]
    full, resumed, ckpt = tmp_path / "full.jsonl", tmp_path / "resumed.jsonl", str(tmp_path / "ckpt")
    launch(2, flags(corpus, "--train-iters", "4", "--log-json", str(full), *common))
    launch(2, flags(corpus, "--train-iters", "2", "--save", ckpt, "--log-json", str(resumed), *common))
    launch(2, flags(corpus, "--train-iters", "4", "--load", ckpt, "--log-json", str(resumed), *common))
    expected, _ = records(full)
    got, _ = records(resumed)
    assert [r["iteration"] for r in got] == [1, 2, 3, 4]
    for e, g in zip(expected, got):
        assert e["lm_loss"] == g["lm_loss"] and e["grad_norm"] == g["grad_norm"]
