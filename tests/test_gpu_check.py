"""The device check's CPU dry run: every check's code path at a tiny shape (imports, model
builds, schedules, checkpoint, generation), so that its first run on a GPU fails on the GPU's
account, not on a typo."""

import json
import os
import subprocess
import sys

from tests.torchrun import ROOT

CHECKS = ["environment", "fp8_weight_refresh", "te_vs_local_parity", "fusion_parity", "grad_accumulation",
          "local_without_apex", "fp8_generation", "train_bf16", "train_fp8", "looprpt_vs_lm"]


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})


def test_dry_run_runs_every_check_on_the_cpu(tmp_path):
    result = _run("--dry-run", "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["plan"]["dry_run"] is True
    by_name = {check["name"]: check for check in report["checks"]}
    assert list(by_name) == CHECKS
    # only the Transformer-Engine comparison cannot run its code path without TE
    assert {name for name, check in by_name.items() if check["status"] != "dry-run"} == {"te_vs_local_parity"}
    assert by_name["te_vs_local_parity"]["status"] == "skipped"
    assert by_name["fp8_generation"]["figures"]["inference_fp8"] is None
    assert by_name["train_bf16"]["figures"]["tokens_per_s"] > 0
    assert "looprpt_vs_lm" in result.stdout and "dry-run" in result.stdout   # the table
    assert os.listdir(tmp_path) == ["gpu_check.json"]                         # the work dir is gone


def test_unknown_check_is_one_line(tmp_path):
    result = _run("--only", "train_bf16", "nonsense", "--out", tmp_path, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--only nonsense" in lines[0]
