"""The bf16 LoopRPT teacher's fp32 EMA state: DP-sharded with the distributed optimizer,
replicated otherwise; equal to the EMA computed directly; checkpointed in a form that loads
under either."""

import pytest

from tests.torchrun import run_json

HARNESS = "tests/harness/sharded_teacher_run.py"


@pytest.mark.slow
def test_sharded_ema_equals_the_direct_ema_and_reshards_through_checkpoints(tmp_path):
    sharded = run_json(HARNESS, 2, ["--dist-opt", "--save", tmp_path / "ckpt"], tmp_path / "sharded.json")
    replicated = run_json(HARNESS, 1, [], tmp_path / "replicated.json")

    assert (sharded["kind"], replicated["kind"]) == ("sharded", "replicated")
    for result in (sharded, replicated):
        assert result["student_moved"]
        assert result["weights_equal_reference"]          # bf16 weights = bf16(direct EMA)
        assert result["checkpoint_state_equals_reference"]  # fp32 state = direct EMA, bit for bit
    full = 4 * replicated["param_count"]
    assert replicated["ema_state_bytes"] == full
    # each of the 2 DP ranks keeps half of the fp32 state (plus the buckets' alignment padding)
    assert full / 2 <= sharded["ema_state_bytes"] <= full / 2 + 4 * 128 * 2 * 4

    # (the two runs' students differ in bf16 rounding: DP=2 reduces gradients in another order)
    # the DP-sharded state, saved, loads whole into a replicated teacher and back into a sharded one
    for nproc, flags, name in ((1, [], "load_replicated"), (2, ["--dist-opt"], "load_sharded")):
        loaded = run_json(HARNESS, nproc, [*flags, "--load", tmp_path / "ckpt"], tmp_path / f"{name}.json")
        assert loaded["state"] == sharded["state"], name
