"""examples/scaling/sweep.py: the table collected from hand-made reports with known values, then a
smoke run of the whole sweep at the smallest size (stage 1, continued LM, LoopRPT, evaluations,
table, plots) and its resumption: a second run redoes nothing, a deleted report is redone alone."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.scripts import load_script
from tests.torchrun import ROOT

SWEEP = os.path.join(ROOT, "examples", "scaling", "sweep.py")
PNG = b"\x89PNG\r\n\x1a\n"


def _sweep_module():
    return load_script(SWEEP, "scaling_sweep")


# ------------------------------------------------------------------------------------------
# collection on hand-made reports
# ------------------------------------------------------------------------------------------
def _model(per_step, hard, exit_steps, exit_acc, exit_hard, frontier):
    return {
        "role": "load", "checkpoint": "/x/iter_0000010", "iteration": 10, "num_layers": 2, "hidden_size": 64,
        "loop_steps": len(per_step), "rl_algo": "none", "num_tokens": 1000,
        "buckets": {"easy": {"fraction": 0.2, "exit_accuracy": 0.9}, "medium": {"fraction": 0.3, "exit_accuracy": 0.5},
                    "hard": {"fraction": 0.5, "exit_accuracy": exit_hard}},
        "per_step": [{"step": i + 1, "accuracy": a, "by_bucket": {"easy": {"accuracy": 0.9}, "medium": {"accuracy": 0.5},
                                                                 "hard": {"accuracy": h}}}
                     for i, (a, h) in enumerate(zip(per_step, hard))],
        "q_exit": {"q": 0.9, "avg_steps": exit_steps, "accuracy": exit_acc, "expected_exit_step": exit_steps - 0.5},
        "q_sweep": [{"q": 0.5, "avg_steps": exit_steps, "accuracy": exit_acc}],
        "pareto_frontier": [{"label": label, "avg_steps": s, "accuracy": a} for label, s, a in frontier],
    }


def _write_report(root, size, method, model):
    path = root / size / "eval" / method / "evaluation.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"schema": "megatron_looprpt.evaluation/1", "models": [model]}))


def test_collect_table_from_hand_made_reports(tmp_path):
    sweep = _sweep_module()
    for size, params in (("a", 1_000_000), ("b", 3_000_000)):
        (tmp_path / size).mkdir()
        (tmp_path / size / "size.json").write_text(json.dumps({"name": size, "params": params}))
    _write_report(tmp_path, "a", "stage1", _model([0.1, 0.2], [0.05, 0.1], 2.0, 0.2, 0.1,
                                                  [("fixed 1", 1.0, 0.1), ("fixed 2", 2.0, 0.2)]))
    _write_report(tmp_path, "a", "lm", _model([0.2, 0.3], [0.1, 0.15], 1.5, 0.28, 0.12,
                                              [("fixed 1", 1.0, 0.2), ("q=0.5", 1.5, 0.28), ("fixed 2", 2.0, 0.3)]))
    _write_report(tmp_path, "a", "looprpt", _model([0.25, 0.3], [0.12, 0.2], 1.25, 0.29, 0.18,
                                                   [("fixed 1", 1.0, 0.25), ("q=0.5", 1.25, 0.29), ("fixed 2", 2.0, 0.3)]))
    # Size b has only its LM report (a sweep still running): a row, no gain.
    _write_report(tmp_path, "b", "lm", _model([0.4, 0.5], [0.3, None], 2.0, 0.5, None, [("fixed 2", 2.0, 0.5)]))

    results = sweep.collect(str(tmp_path), ["a", "b"])
    rows = {(r["size"], r["method"]): r for r in results["rows"]}
    assert set(rows) == {("a", "stage1"), ("a", "lm"), ("a", "looprpt"), ("b", "lm")}
    lm, rl = rows["a", "lm"], rows["a", "looprpt"]
    assert lm["params"] == 1_000_000 and rows["b", "lm"]["params"] == 3_000_000
    assert lm["per_step_accuracy"] == [0.2, 0.3] and lm["accuracy"] == 0.3
    assert lm["hard_accuracy"] == 0.15 and rl["hard_accuracy"] == 0.2
    assert (lm["exit_avg_steps"], lm["exit_accuracy"], lm["exit_hard_accuracy"]) == (1.5, 0.28, 0.12)
    # Matched compute: the fewest Q-exit steps of the two methods (1.25); the best frontier point
    # within it: LM's fixed depth 1 (0.2), LoopRPT's q=0.5 (0.29), stage 1's fixed 1 (0.1).
    assert {r["matched_steps"] for r in rows.values() if r["size"] == "a"} == {1.25}
    assert (lm["matched_accuracy"], rl["matched_accuracy"], rows["a", "stage1"]["matched_accuracy"]) == (0.2, 0.29, 0.1)
    assert rows["b", "lm"]["matched_steps"] == 2.0 and rows["b", "lm"]["hard_accuracy"] is None
    (gain,) = results["gains"]
    assert gain["size"] == "a"
    assert gain["hard_accuracy"] == pytest.approx(0.05)
    assert gain["exit_hard_accuracy"] == pytest.approx(0.06)
    assert gain["accuracy"] == pytest.approx(0.0)
    assert gain["matched_accuracy"] == pytest.approx(0.09)

    assert json.loads((tmp_path / "results.json").read_text())["rows"] == results["rows"]
    table = (tmp_path / "results.md").read_text()
    assert "| a | 1.0M | continued LM | 0.2000 / 0.3000 | 0.1500 | 1.50 (q=0.9) | 0.2800 | 0.1200 | 0.2000 (1.25) |" in table
    assert "| b | 3.0M | continued LM | 0.4000 / 0.5000 | - |" in table
    assert "| a | 1.0M | +0.0500 | +0.0600 | +0.0000 | +0.0900 |" in table
    # A fixed budget for every size instead.
    fixed = {(r["size"], r["method"]): r for r in sweep.collect(str(tmp_path), ["a", "b"], matched_steps=1.0)["rows"]}
    assert fixed["a", "looprpt"]["matched_accuracy"] == 0.25 and fixed["b", "lm"]["matched_accuracy"] is None
    if importlib.util.find_spec("matplotlib") is not None:
        for name in (sweep.PER_STEP_PLOT, sweep.COMPUTE_PLOT, sweep.GAIN_PLOT):
            assert (tmp_path / name).read_bytes()[:8] == PNG


def test_sizes_and_cluster_profile():
    sweep = _sweep_module()
    assert len(sweep.SWEEPS["cpu"]) >= 4 and len(sweep.SWEEPS["ouro"]) >= 4
    cfg = sweep.config_from_args(sweep.build_parser().parse_args(
        ["--sweep", "ouro", "--sizes", "ouro-1.4b", "--data-path", "/d/x", "--launcher", "torchrun --nproc-per-node 8",
         "--train-flags", "--bf16 --recompute-granularity full"]))
    assert [s.preset for s in cfg.sizes] == ["ouro-1.4b"]
    assert cfg.launcher == ["torchrun", "--nproc-per-node", "8"]
    assert cfg.train_flags == ["--bf16", "--recompute-granularity", "full"]
    with pytest.raises(sweep.SweepError, match="--data-path"):
        sweep.config_from_args(sweep.build_parser().parse_args(["--sweep", "ouro"]))


def test_difficulty_by_quantiles_unless_thresholds_are_given():
    sweep = _sweep_module()

    def flags(argv):
        return sweep.difficulty_flags(sweep.config_from_args(sweep.build_parser().parse_args(argv)))

    # Hard: the top 20% of tokens by the stage-1 model's entropy.
    assert flags([]) == ["--difficulty-quantiles", "0.5", "0.8"]
    assert flags(["--difficulty-quantiles", "0.6", "0.9"]) == ["--difficulty-quantiles", "0.6", "0.9"]
    assert flags(["--difficulty-thresholds", "1", "3"]) == ["--difficulty-thresholds", "1.0", "3.0"]
    with pytest.raises(SystemExit):
        sweep.build_parser().parse_args(["--difficulty-quantiles", "0.5", "0.8", "--difficulty-thresholds", "1", "3"])
    with pytest.raises(sweep.SweepError, match="nor a preset"):
        sweep.config_from_args(sweep.build_parser().parse_args(["--sizes", "huge"]))


# ------------------------------------------------------------------------------------------
# smoke run at the smallest size, then resumption
# ------------------------------------------------------------------------------------------
SMOKE = ["--sizes", "tiny", "--stage1-iters", "4", "--continue-iters", "2", "--eval-iters", "1"]
STAGES = ("stage1", "lm", "looprpt")


def _sweep(out):
    result = subprocess.run([sys.executable, SWEEP, *SMOKE, "--out", str(out)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _mtimes(root):
    return {os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns
            for d, _, names in os.walk(root) for n in names}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    return out, _sweep(out)


@pytest.mark.slow
def test_smoke_run_produces_checkpoints_reports_table_and_plots(smoke):
    out, stdout = smoke
    size = out / "tiny"
    thresholds, fractions = set(), set()
    for stage, iters in zip(STAGES, (4, 2, 2)):
        assert (size / stage / "latest_checkpointed_iteration.txt").read_text().strip() == str(iters)
        report = json.loads((size / "eval" / stage / "evaluation.json").read_text())
        (model,) = report["models"]
        assert model["checkpoint"].endswith(f"{stage}/iter_{iters:07d}")
        assert model["rl_algo"] == ("looprpt" if stage == "looprpt" else "none")
        if stage != "stage1":   # difficulty buckets by the stage-1 model, the same for both methods
            assert model["reference"]["checkpoint"].endswith("stage1/iter_0000004")
        # The top 20% by the stage-1 model's entropy are hard: at least 20% less one token (the
        # threshold interpolates between two order statistics), more where tokens tie it
        # (identical contexts, such as the reasoning problems' shared templates, have identical
        # entropies; a fresh CI run saw 22.7%)
        assert report["difficulty"]["quantiles"] == [0.5, 0.8]
        assert 0.2 - 1 / model["num_tokens"] <= model["buckets"]["hard"]["fraction"] <= 0.3
        thresholds.add(tuple(report["difficulty"]["thresholds"]))
        fractions.add(tuple(model["buckets"][b]["fraction"] for b in ("easy", "medium", "hard")))
    # the same stage-1 entropies of the same tokens for all three: the same buckets
    assert len(thresholds) == 1 and len(fractions) == 1
    assert not list(size.glob("eval/*.partial"))
    assert json.loads((size / "size.json").read_text())["params"] > 1e6
    results = json.loads((out / "results.json").read_text())
    assert [(r["size"], r["method"]) for r in results["rows"]] == [("tiny", m) for m in STAGES]
    assert [g["size"] for g in results["gains"]] == ["tiny"]
    assert "| tiny |" in (out / "results.md").read_text() and "| tiny |" in stdout
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("per_step_accuracy_by_size.png", "accuracy_vs_compute.png", "hard_token_gain.png"):
            assert (out / name).read_bytes()[:8] == PNG


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_redoes_a_deleted_report(smoke):
    out, _ = smoke
    size = out / "tiny"
    before = _mtimes(size)
    stdout = _sweep(out)
    assert "pretrain_looprpt.py" not in stdout and "tools/evaluate.py" not in stdout
    for stage in STAGES:
        assert f"skip {size / stage}: finished" in stdout
        assert f"skip {size / 'eval' / stage}: report exists" in stdout
    assert _mtimes(size) == before

    (size / "eval" / "lm" / "evaluation.json").unlink()
    stdout = _sweep(out)
    assert "pretrain_looprpt.py" not in stdout
    assert stdout.count("tools/evaluate.py") == 1 and f"--load {size / 'lm'} " in stdout
    after = _mtimes(size)
    redone = {p for p in after if before.get(p) != after[p]}
    assert redone and all(p.startswith(str(size / "eval" / "lm")) or p.startswith(str(size / "logs"))
                          for p in redone), redone
    assert (size / "eval" / "lm" / "evaluation.json").exists()


@pytest.mark.slow
def test_interrupted_training_resumes_from_its_latest_checkpoint(smoke):
    """The LoopRPT stage as if killed after its first checkpoint: the rerun resumes it at
    iteration 1, then re-evaluates it (its old report was stale) and nothing else."""
    out, _ = smoke
    size = out / "tiny"
    rl = size / "looprpt"
    import shutil

    shutil.rmtree(rl / "iter_0000002")
    (rl / "latest_checkpointed_iteration.txt").write_text("1")
    stdout = _sweep(out)
    assert f"train {rl}: resuming at iteration 1 of 2" in stdout
    assert "loaded checkpoint from" in stdout and f"--load {rl} " in stdout and "--finetune" not in stdout
    assert (rl / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert stdout.count("pretrain_looprpt.py") == 1 and stdout.count("tools/evaluate.py") == 1
    assert f"skip {size / 'eval' / 'lm'}: report exists" in stdout
