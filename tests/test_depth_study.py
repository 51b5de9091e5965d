"""examples/depth_study.py: the tables and the two comparisons the depth study's verdict rests on,
collected from hand-made evaluation reports with known values (runs under --out/PART/nN_Iit/)."""

import importlib.util
import json
import os

import pytest

from tests.scripts import load_script

STUDY = os.path.join("examples", "depth_study.py")


def _study_module():
    return load_script(STUDY, "depth_study")


def _task_report(per_k):
    """per_k: {k: [accuracy per loop step]} as tools/evaluate.py --task-data writes it."""
    groups = [{"group": k, "per_step": [{"accuracy": a} for a in accs]} for k, accs in per_k.items()]
    return {"models": [{"task": {"groups": groups}}]}


def _text_report(per_step_nll, lm_loss):
    return {"models": [{"per_step": [{"nll": x} for x in per_step_nll], "lm_loss": lm_loss}]}


def _write(runs_dir, arm, seed, report):
    path = os.path.join(runs_dir, arm, f"seed{seed}", "eval", "evaluation.json")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump(report, f)


def _heldout(path):
    # k=1: answers " 3" x3 and " 4" x1 (majority 0.75); k=2: " 5" x1, " 6" x1 (0.5)
    with open(path, "w") as f:
        f.write(json.dumps({"segments": ["0 16", " 3", " 16", " 3", " 16", " 3", " 16", " 4"], "k": [1, 1, 1, 1]}) + "\n")
        f.write(json.dumps({"segments": ["0 16 17", " 5", " 16 17", " 6"], "k": [2, 2]}) + "\n")


def test_comparisons_at_the_largest_k(tmp_path):
    study = _study_module()
    runs = study.part_dir(str(tmp_path), "task", 1, 1200)
    assert runs == os.path.join(str(tmp_path), "task", "n1_1200it")
    assert study.part_dir(str(tmp_path), "text", 2, 300, True, "uniform") == \
        os.path.join(str(tmp_path), "text", "n2_300it_ouroloop_wuniform")
    assert study.part_dir(str(tmp_path), "text", 2, 300, False, "last:0.7") == \
        os.path.join(str(tmp_path), "text", "n2_300it_wlast0.7")
    # loop: step 1 -> step 2 gains 0.5, 0.6, 0.7 (mean 0.6, std 0.1: beyond 2 std)
    loop = {1: [(0.1, 0.6), (0.2, 0.8), (0.1, 0.8)], 2: [(1.0, 1.0)] * 3}
    t1 = [0.3, 0.6, 0.45]         # mean 0.45, std 0.15 against loop's last step 0.733 +- 0.115
    deep = [0.9, 0.9, 0.9]
    for seed in range(3):
        _write(runs, "loop", seed, _task_report({"1": [1.0, 1.0], "2": list(loop[1][seed])}))
        _write(runs, "t1", seed, _task_report({"1": [1.0], "2": [t1[seed]]}))
        _write(runs, "deep", seed, _task_report({"1": [1.0], "2": [deep[seed]]}))
    heldout = str(tmp_path / "heldout.jsonl")
    _heldout(heldout)
    baseline = study.majority_baseline(heldout)
    assert baseline == {"1": 0.75, "2": 0.5}
    arms = study.arms(1, 2)
    assert [(a.name, a.num_layers, a.loop_steps) for a in arms] == [("t1", 1, 1), ("loop", 1, 2), ("deep", 2, 1)]
    reports = study._reports(runs, arms, [0, 1, 2])
    result = study.collect_task(reports, {a.name: a.description for a in arms}, baseline)

    assert result["largest_k"] == "2"
    (m1, s1), (m2, s2) = result["arms"]["loop"]["accuracy"]["2"]
    assert (m1, m2) == (pytest.approx(0.4 / 3), pytest.approx(2.2 / 3))
    first_step = result["last_vs_first_step"]
    assert first_step["gain"] == pytest.approx(0.6) and first_step["std"] == pytest.approx(0.1)
    assert first_step["beyond_2_std"]
    vs_t1 = result["loop_vs_t1"]
    assert vs_t1["gain"] == pytest.approx(2.2 / 3 - 0.45)
    assert vs_t1["std"] == pytest.approx((s2 ** 2 + 0.15 ** 2) ** 0.5)
    assert not vs_t1["beyond_2_std"]   # 0.283 against 2 x 0.189

    # the same runs with one seed of the loop model that never learned: the paired gain's
    # spread grows past half its mean and the verdict flips
    _write(runs, "loop", 3, _task_report({"1": [1.0, 1.0], "2": [0.1, 0.1]}))
    _write(runs, "t1", 3, _task_report({"1": [1.0], "2": [0.4]}))
    _write(runs, "deep", 3, _task_report({"1": [1.0], "2": [0.9]}))
    flipped = study.collect_task(study._reports(runs, arms, [0, 1, 2, 3]),
                                 {a.name: a.description for a in arms}, baseline)
    assert flipped["last_vs_first_step"]["gain"] == pytest.approx(0.45)
    assert not flipped["last_vs_first_step"]["beyond_2_std"]


def test_collect_only_writes_both_tables(tmp_path, monkeypatch):
    study = _study_module()
    out = tmp_path / "study"
    task_runs, text_runs = study.part_dir(str(out), "task", 1, 1200), study.part_dir(str(out), "text", 2, 300)
    for seed in (1, 2):
        _write(task_runs, "loop", seed, _task_report({"1": [1.0, 1.0], "2": [0.2, 0.9 + 0.01 * seed]}))
        _write(task_runs, "t1", seed, _task_report({"1": [1.0], "2": [0.3]}))
        _write(task_runs, "deep", seed, _task_report({"1": [1.0], "2": [0.95]}))
        _write(text_runs, "loop", seed, _text_report([5.0, 4.9 + 0.01 * seed], 4.95))
        _write(text_runs, "t1", seed, _text_report([4.5], 4.5))
        _write(text_runs, "deep", seed, _text_report([4.4], 4.4))
    # --collect-only needs the data only for its flags and the majority baseline: a held-out
    # file with known answers, an index that marks the task's data as written, and no corpus
    (out / "data").mkdir()
    (out / "data" / "composition_segments_document.idx").write_bytes(b"")
    _heldout(str(out / "data" / "composition_heldout.jsonl"))
    monkeypatch.setattr(study, "text_flags", lambda iters: [])
    study.main(["--out", str(out), "--collect-only", "--seeds", "1", "2", "--loop-steps", "2", "--max-hops", "2"])

    table = (out / "results.md").read_text()
    assert "| loop: 1 layer looped T=2 | 2 | 0.200 ± 0.000 | 0.915 ± 0.007 | 0.500 |" in table
    assert "| t1: 1 layer, T=1 (same parameters) | 2 | 0.300 ± 0.000 |  | 0.500 |" in table
    assert "loop's last step minus its first +0.715" in table and "beyond two standard deviations" in table
    assert "| loop: 2 layers looped T=2 | 5.000 ± 0.000 | 4.915 ± 0.007 | 4.950 ± 0.000 | yes |" in table
    assert "| deep: 4 unshared layers, T=1 (same compute) | 4.400 ± 0.000 |  | 4.400 ± 0.000 | yes |" in table
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["task_num_layers"] == 1 and results["config"]["text_num_layers"] == 2
    assert results["task"]["last_vs_first_step"]["beyond_2_std"]
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("accuracy_vs_step.png", "accuracy_vs_k.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_of_another_recipe_is_refused_not_reported(tmp_path, monkeypatch):
    study = _study_module()
    save_dir = str(tmp_path / "loop" / "seed1" / "checkpoint")
    arm = study.arms(2, 4)[1]
    flags = study.train_flags(["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512"],
                              arm, 1, 300, save_dir)
    saved = {}
    monkeypatch.setattr(study, "read_checkpoint_args", lambda path: saved.get(path))
    study.refuse_another_recipe(save_dir, flags)          # nothing trained there yet
    current = vars(study.parse_args(flags))
    saved[save_dir] = {name: current[name] for name in study.RECIPE_SETTINGS}
    study.refuse_another_recipe(save_dir, flags)          # this recipe's run: reused
    # a run of an older checkout: uniform weights, saved before injection existed (Ouro's loop)
    saved[save_dir] = {"step_loss_weights": "uniform", "exit_entropy_coef": current["exit_entropy_coef"]}
    with pytest.raises(SystemExit) as info:
        study.refuse_another_recipe(save_dir, flags)
    message = str(info.value)
    assert "\n" not in message and save_dir in message
    assert f"--step-loss-weights uniform (now {current['step_loss_weights']})" in message
    assert "--loop-input-injection False (now True)" in message
