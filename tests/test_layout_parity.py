"""Loss and grad norm of 3 optimizer steps are the same under every parallel layout (fp32)."""

import pytest

from tests.torchrun import run_json

LAYOUTS = {
    "tp2": (2, ["--tp", "2"]),
    "tp2_sp": (2, ["--tp", "2", "--sp"]),
    "pp2": (2, ["--pp", "2"]),
    "dp2_distopt": (2, ["--dist-opt"]),
    "tp2_pp2": (4, ["--tp", "2", "--pp", "2"]),
    "tp2_pp2_sp": (4, ["--tp", "2", "--pp", "2", "--sp"]),
}
_reference = {}


def reference(loops, tmp_path_factory):
    if loops not in _reference:
        out = tmp_path_factory.mktemp("ref") / "ref.json"
        _reference[loops] = run_json("tests/harness/layout_run.py", 1, ["--loops", loops], out)
    return _reference[loops]


def assert_close(a, b, rel=1e-5):
    assert abs(a - b) <= rel * max(abs(a), abs(b)), (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("loops", [1, 2, 4])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, loops, tmp_path, tmp_path_factory):
    nproc, flags = LAYOUTS[layout]
    expected = reference(loops, tmp_path_factory)
    got = run_json("tests/harness/layout_run.py", nproc, [*flags, "--loops", loops], tmp_path / "run.json")
    assert len(got) == len(expected) == 3
    for step, (g, e) in enumerate(zip(got, expected)):
        assert_close(g["loss"], e["loss"])
        assert_close(g["grad_norm"], e["grad_norm"])
        for g_ce, e_ce in zip(g["step_ce"], e["step_ce"]):
            assert_close(g_ce, e_ce)
    # The model must actually have trained: the loss moved.
    assert got[0]["loss"] != got[-1]["loss"]
