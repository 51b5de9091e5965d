"""Checkpoints across megatron-core releases: one written under 0.16 resumes under 0.17+ and the
reverse, repeating the uninterrupted run's losses, grad norms and RNG draws exactly.

Needs a second interpreter with the other release, named by LOOPRPT_OTHER_PYTHON (.ci/run's
py312 leg points it at the py311 leg's environment); skipped without it.
"""

import os
import subprocess
import sys

import pytest

from tests.test_checkpointing import HARNESS, assert_same_steps
from tests.torchrun import ROOT, run_json

OTHER = os.environ.get("LOOPRPT_OTHER_PYTHON")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not OTHER, reason="LOOPRPT_OTHER_PYTHON (a Python with the other "
                                         "megatron-core release) is not set"),
]
# DP=2 with the distributed optimizer and an extra model: every kind of entry a checkpoint holds
FLAGS = ["--dist-opt", "--forbid-gather", "--teacher"]


def _megatron_core(python):
    from packaging.version import Version

    result = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('megatron-core'))"],
                            capture_output=True, text=True, timeout=120, check=True)
    return Version(result.stdout.strip())


@pytest.fixture(scope="module")
def pythons():
    """{"old": the interpreter with megatron-core 0.16, "new": the one with 0.17+}."""
    versions = {python: _megatron_core(python) for python in (sys.executable, OTHER)}
    old = [p for p, v in versions.items() if v.release[:2] == (0, 16)]
    new = [p for p, v in versions.items() if v.release[:2] >= (0, 17)]
    assert len(old) == 1 and len(new) == 1, (
        f"LOOPRPT_OTHER_PYTHON: need one interpreter with megatron-core 0.16 and one with 0.17+, got {versions}")
    return {"old": old[0], "new": new[0]}


def _run(python, nproc, args, out):
    return run_json(HARNESS, nproc, [str(a) for a in args], str(out), timeout=600, python=python)


@pytest.mark.parametrize("writer,reader", [("old", "new"), ("new", "old")])
def test_resume_across_releases_is_exact(pythons, tmp_path, writer, reader):
    ref = _run(pythons[writer], 2, [*FLAGS, "--steps", 4, "--save", tmp_path / "ckpt", "--save-at", 2],
               tmp_path / "ref.json")
    out = _run(pythons[reader], 2, [*FLAGS, "--steps", 4, "--load", tmp_path / "ckpt"],
               tmp_path / "resume.json")
    loaded = out["loaded"]
    assert loaded["iteration"] == 2 and loaded["optimizer"] and loaded["rng"]
    assert loaded["extra_models"] == ["teacher"]
    assert_same_steps(out["records"], ref["records"][2:])


_PROBE = """
import sys
from megatron_looprpt.import_notes import silence_import_notes
from megatron_looprpt.deferred_compile import defer_megatron_compiles
silence_import_notes()
defer_megatron_compiles()
from megatron_looprpt.training.checkpointing import CheckpointError, read_checkpoint_args
try:
    print("steps", read_checkpoint_args(sys.argv[1])["harness"]["steps"])
except CheckpointError as error:
    print("error", error)
"""


def test_common_state_only_inside_the_shards(pythons, tmp_path):
    """A megatron-core 0.17+ checkpoint without the common.pt we add (another tool's): 0.17+
    read it; 0.16 refuses it in one line that says why and what to use."""
    _run(pythons["new"], 1, ["--steps", 1, "--save", tmp_path / "ckpt", "--save-at", 1], tmp_path / "run.json")
    os.remove(tmp_path / "ckpt" / "iter_0000001" / "common.pt")
    said = {}
    for name, python in pythons.items():
        result = subprocess.run([python, "-c", _PROBE, str(tmp_path / "ckpt")], cwd=ROOT, capture_output=True,
                                text=True, timeout=300,
                                env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
        assert result.returncode == 0, result.stderr[-3000:]
        said[name] = result.stdout.strip().splitlines()[-1]
    assert said["new"] == "steps 1"
    assert said["old"].startswith("error ") and "megatron-core 0.16" in said["old"], said["old"]
    assert "only inside the shards" in said["old"] and "megatron-core 0.17+" in said["old"]
