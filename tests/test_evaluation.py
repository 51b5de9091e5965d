"""Evaluation: the metrics on hand-built inputs with known answers, then tools/evaluate.py end to
end on a real indexed dataset and a checkpoint trained by pretrain_looprpt.py, in one process and
under TP=2, PP=2 and DP=2 (the same numbers), plus its one-line errors."""

import importlib.util
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from megatron_looprpt.evaluation import metrics
from megatron_looprpt.evaluation.metrics import MetricSpec
from tests.torchrun import ROOT, run

EVALUATE = "tools/evaluate.py"


# ------------------------------------------------------------------------------------------
# metrics on hand-built inputs
# ------------------------------------------------------------------------------------------
def test_step_accuracy_and_nll_sums_skip_masked_positions():
    labels = torch.tensor([[0, 1, 2, 9]])
    predictions = torch.tensor([[[0, 1, 2, 9]], [[0, 1, 0, 0]]])        # [T=2, b=1, s=4]
    label_logprobs = torch.log(torch.tensor([[[0.5, 0.25, 1.0, 0.1]], [[1.0, 0.5, 0.5, 0.1]]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    correct = metrics.step_correct(predictions, labels)
    assert metrics.masked_step_sums(correct, mask).tolist() == [3.0, 2.0]
    nll = metrics.masked_step_sums(-label_logprobs, mask)
    assert torch.allclose(nll, torch.tensor([math.log(2) + math.log(4), 2 * math.log(2)]))


def test_difficulty_buckets_put_thresholds_in_the_upper_bucket():
    entropy = torch.tensor([[0.5, 1.0, 2.0, 3.0, 3.5]])
    buckets = metrics.difficulty_buckets(entropy, (1.0, 3.0))
    assert buckets.tolist() == [[0, 1, 1, 2, 2]]                     # easy < 1 <= medium < 3 <= hard
    masks = metrics.bucket_masks(buckets, torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]]))
    assert masks.sum(dim=(1, 2)).tolist() == [1.0, 1.0, 2.0]          # sizes, masked one left out


def test_q_exit_steps_first_step_reaching_q_else_last():
    # Three tokens' exit distributions over T=3 steps (CDFs 0.5/0.8/1.0, 0.1/0.2/1.0, and one
    # whose CDF never reaches 0.95).
    probs = torch.tensor([[0.5, 0.1, 0.2], [0.3, 0.1, 0.2], [0.2, 0.8, 0.5]], dtype=torch.float64)
    probs = probs.view(3, 1, 3)
    steps = metrics.q_exit_sweep(probs, (0.1, 0.5, 0.6, 0.95, 1.0))
    assert steps[:, 0].tolist() == [[0, 0, 0], [0, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    per_step = torch.tensor([[10.0, 11.0, 12.0], [20.0, 21.0, 22.0], [30.0, 31.0, 32.0]]).view(3, 1, 3)
    assert metrics.at_exit_step(per_step, steps[2:3]).tolist() == [[[20.0, 31.0, 32.0]]]


def _hand_built_batch():
    """T=2 steps, 3 tokens. Gate logits +20 / -20 / 0 make token 0 exit after step 1 and token 1
    run both steps for q=0.5; token 2 (lambda=0.5) exits after step 1 at q=0.5. No token's exit
    CDF reaches 1 before the last step, so q=1 runs every token 2 steps."""
    labels = torch.tensor([[4, 5, 6]])
    predictions = torch.tensor([[[4, 0, 6]], [[0, 5, 0]]])            # step 1 right on 0 and 2
    label_logprobs = torch.log(torch.tensor([[[0.5, 0.25, 0.5]], [[0.25, 0.5, 0.125]]]))
    entropy = torch.tensor([[[1.0, 2.0, 3.0]], [[0.5, 1.0, 1.5]]])
    gate_logits = torch.tensor([[[20.0, -20.0, 0.0]], [[0.0, 0.0, 0.0]]])
    reference_entropy = torch.tensor([[0.5, 2.0, 5.0]])                # easy, medium, hard
    mask = torch.ones(1, 3)
    return labels, mask, label_logprobs, predictions, entropy, gate_logits, reference_entropy


SPEC = MetricSpec(exit_thresholds=(0.5, 1.0), default_threshold=0.5, difficulty_thresholds=(1.0, 3.0))


def test_token_sums_known_answers():
    sums = metrics.token_sums(*_hand_built_batch(), SPEC)
    assert sums["tokens"].tolist() == [3.0]
    assert sums["step_correct"].tolist() == [2.0, 1.0]
    assert sums["bucket_tokens"].tolist() == [1.0, 1.0, 1.0]
    assert sums["bucket_step_correct"].tolist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    assert sums["sweep_correct"].tolist() == [3.0, 1.0]                  # q=0.5: every exit is right
    assert sums["sweep_steps"].tolist() == [4.0, 6.0]
    assert sums["exit_correct"].tolist() == [1.0, 1.0, 1.0]
    assert sums["exit_steps"].tolist() == [1.0, 2.0, 1.0]
    assert torch.allclose(sums["step_nll"], torch.tensor([math.log(2 * 4 * 2), math.log(4 * 2 * 8)]))


def test_token_sums_add_up_across_micro_batches():
    """Sums of two halves equal the sums of the whole: the property the reduction relies on."""
    g = torch.Generator().manual_seed(0)
    T, b, s = 3, 4, 5
    labels = torch.randint(0, 7, (b, s), generator=g)
    args = (labels, (torch.rand(b, s, generator=g) > 0.2).float(), -torch.rand(T, b, s, generator=g) * 3,
            torch.randint(0, 7, (T, b, s), generator=g), torch.rand(T, b, s, generator=g) * 4,
            torch.randn(T, b, s, generator=g) * 2, torch.rand(b, s, generator=g) * 4)
    spec = MetricSpec(default_threshold=0.7, difficulty_thresholds=(1.5, 2.5))
    whole = metrics.token_sums(*args, spec)
    halves = [metrics.token_sums(*(a[..., :2, :] if a.dim() == 3 else a[:2] for a in args), spec),
              metrics.token_sums(*(a[..., 2:, :] if a.dim() == 3 else a[2:] for a in args), spec)]
    total = metrics.add_sums(metrics.add_sums(None, halves[0]), halves[1])
    for name, value in whole.items():
        assert torch.allclose(total[name], value.double(), atol=1e-5), name
    assert total["bucket_tokens"].sum() == total["tokens"].sum()


def test_summarize_known_answers_and_frontier():
    summary = metrics.summarize(metrics.token_sums(*_hand_built_batch(), SPEC), SPEC)
    assert summary["num_tokens"] == 3
    assert [s["accuracy"] for s in summary["per_step"]] == pytest.approx([2 / 3, 1 / 3])
    assert summary["per_step"][1]["by_bucket"]["medium"]["accuracy"] == 1.0
    sweep = [v for p in summary["q_sweep"] for v in (p["q"], p["avg_steps"], p["accuracy"])]
    assert sweep == pytest.approx([0.5, 4 / 3, 1.0, 1.0, 2.0, 1 / 3])
    assert summary["q_exit"]["avg_steps"] == pytest.approx(4 / 3)
    assert summary["q_exit"]["accuracy"] == 1.0
    assert {b: v["tokens"] for b, v in summary["buckets"].items()} == {"easy": 1, "medium": 1, "hard": 1}
    assert summary["buckets"]["medium"]["avg_exit_steps"] == 2.0
    # Running every token one step (1, 2/3) and Q-exit at 0.5 (4/3, 1) are optimal; q=1 and
    # two fixed steps (2, 1/3) are dominated by q=0.5.
    assert [p["label"] for p in summary["pareto_frontier"]] == ["fixed 1", "q=0.5"]


def test_summarize_reports_empty_buckets_as_null():
    batch = list(_hand_built_batch())
    batch[-1] = torch.tensor([[5.0, 5.0, 5.0]])                        # every token hard
    summary = metrics.summarize(metrics.token_sums(*batch, SPEC), SPEC)
    assert summary["buckets"]["easy"]["tokens"] == 0
    assert summary["buckets"]["easy"]["exit_accuracy"] is None
    assert summary["per_step"][0]["by_bucket"]["easy"]["accuracy"] is None
    assert summary["per_step"][0]["by_bucket"]["hard"]["accuracy"] == pytest.approx(2 / 3)


def test_pareto_frontier():
    points = [(1, 0.5), (2, 0.7), (2, 0.6), (3, 0.7), (1, 0.5), (0.5, 0.2)]
    # (2, 0.6) and (3, 0.7) are dominated by (2, 0.7); the two equal points dominate neither.
    assert metrics.pareto_frontier(points) == [5, 0, 4, 1]
    assert metrics.pareto_frontier([]) == []


# ------------------------------------------------------------------------------------------
# end to end: a real indexed dataset, a trained checkpoint, tools/evaluate.py
# ------------------------------------------------------------------------------------------
MODEL_FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
               "--num-query-groups", "2", "--ffn-hidden-size", "128", "--seq-length", "32",
               "--loop-steps", "3", "--transformer-impl", "local"]
# easy < 0.5 <= medium < 2 <= hard nats: every bucket is populated for the model trained below.
EVAL_FLAGS = ["--eval-iters", "3", "--difficulty-thresholds", "0.5", "2"]


def _write_documents(path: str, count: int = 300) -> None:
    """Documents of 12 fixed 6-token phrases in random order: inside a phrase the next token is
    determined (easy once learned), at a phrase boundary it is one of 12 (hard)."""
    rng = random.Random(0)
    phrases = [list(range(6 * p, 6 * p + 6)) for p in range(12)]
    with open(path, "w") as f:
        for _ in range(count):
            ids = [t for _ in range(rng.randrange(3, 10)) for t in rng.choice(phrases)]
            f.write(json.dumps({"text": " ".join(map(str, ids))}) + "\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An indexed dataset and a checkpoint directory with iterations 30 and 60."""
    from megatron_looprpt.data.datasets import preprocess_jsonl

    root = tmp_path_factory.mktemp("eval")
    _write_documents(str(root / "docs.jsonl"))
    prefix = preprocess_jsonl(str(root / "docs.jsonl"), str(root / "data" / "phrases"), "NullTokenizer",
                              vocab_size=256)["text"]
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "pretrain_looprpt.py"), *MODEL_FLAGS,
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--data-path", prefix,
         "--split", "80,10,10", "--micro-batch-size", "4", "--global-batch-size", "8",
         "--train-iters", "60", "--lr", "3e-2", "--min-lr", "3e-3", "--lr-warmup-iters", "2",
         "--save", str(root / "ckpt"), "--save-interval", "30", "--log-interval", "30",
         "--no-progress-bar"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return {"root": root, "prefix": prefix, "ckpt": str(root / "ckpt"),
            "early": str(root / "ckpt" / "iter_0000030"), "late": str(root / "ckpt" / "iter_0000060")}


def evaluate(nproc, argv, out_dir):
    result = run(EVALUATE, nproc, [*argv, "--output-dir", str(out_dir)], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(os.path.join(out_dir, "evaluation.json")) as f:
        return json.load(f), result.stdout


@pytest.fixture(scope="module")
def single(trained, tmp_path_factory):
    """One process, default reference, the early checkpoint as --compare."""
    return evaluate(1, ["--load", trained["ckpt"], "--compare", trained["early"], *EVAL_FLAGS],
                    tmp_path_factory.mktemp("single"))


def _explicit_reference_args(trained):
    # The --load model named as --reference: the same buckets as the default reference.
    return ["--load", trained["ckpt"], "--compare", trained["early"], "--reference", trained["late"],
            *EVAL_FLAGS]


@pytest.fixture(scope="module")
def single_explicit_reference(trained, tmp_path_factory):
    return evaluate(1, _explicit_reference_args(trained), tmp_path_factory.mktemp("single_ref"))


def test_report_fields_and_console_table(single, trained):
    report, stdout = single
    assert report["schema"] == "megatron_looprpt.evaluation/1"
    assert report["data"]["split_name"] == "valid" and report["data"]["global_batch_size"] == 8
    assert report["difficulty"]["thresholds"] == [0.5, 2.0]
    assert report["exit_thresholds"] == pytest.approx([0.1 * i for i in range(1, 11)])
    load, compare = report["models"]
    assert (load["role"], load["iteration"]) == ("load", 60)
    assert (compare["role"], compare["iteration"]) == ("compare", 30)
    assert load["reference"]["checkpoint"] is None
    assert "--load model itself" in load["reference"]["description"]
    assert load["reference"]["step"] == 3
    for model in (load, compare):
        assert model["num_tokens"] == 3 * 8 * 32
        assert sum(b["tokens"] for b in model["buckets"].values()) == model["num_tokens"]
        assert all(b["tokens"] > 0 for b in model["buckets"].values())
        assert [s["step"] for s in model["per_step"]] == [1, 2, 3]
        for step in model["per_step"]:
            assert {"accuracy", "nll", "entropy", "by_bucket"} <= set(step)
            assert set(step["by_bucket"]) == {"easy", "medium", "hard"}
        assert [p["q"] for p in model["q_sweep"]] == report["exit_thresholds"]
        assert all(1.0 <= p["avg_steps"] <= 3.0 for p in model["q_sweep"])
        assert model["q_exit"]["q"] == 0.9               # the checkpoint's --exit-threshold
        assert 1.0 <= model["q_exit"]["avg_steps"] <= 3.0
        # q=1 runs every token to the last step: its accuracy is the last step's.
        assert model["q_sweep"][-1]["avg_steps"] == 3.0
        assert model["q_sweep"][-1]["accuracy"] == model["per_step"][-1]["accuracy"]
        frontier = [(p["avg_steps"], p["accuracy"]) for p in model["pareto_frontier"]]
        candidates = [(p["avg_steps"], p["accuracy"]) for p in model["q_sweep"]] + [
            (float(s["step"]), s["accuracy"]) for s in model["per_step"]]
        assert frontier and set(frontier) <= set(candidates)
        assert max(a for _, a in frontier) == max(a for _, a in candidates)
    # Both models are bucketed by the same (the --load model's) entropies.
    for bucket in ("easy", "medium", "hard"):
        for key in ("tokens", "mean_reference_entropy"):
            assert load["buckets"][bucket][key] == compare["buckets"][bucket][key]
    assert "q avg steps" in stdout and "Pareto frontier" in stdout and "hard acc" in stdout


def test_plots_written_when_matplotlib_is_installed(single, trained):
    _, stdout = single
    out_dir = os.path.dirname(stdout.rsplit("report: ", 1)[1].splitlines()[0])
    plots = [os.path.join(out_dir, name) for name in ("per_step_accuracy.png", "accuracy_vs_steps.png")]
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in stdout and not any(os.path.exists(p) for p in plots)
    else:
        for path in plots:
            with open(path, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_default_reference_is_the_load_model_at_its_last_step(single, single_explicit_reference):
    (default, _), (explicit, _) = single, single_explicit_reference
    assert explicit["models"][0]["reference"]["checkpoint"].endswith("iter_0000060")
    for a, b in zip(default["models"], explicit["models"]):
        assert {**a, "reference": None} == {**b, "reference": None}


def _numbers(tree, path=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _numbers(value, f"{path}[{i}]")
    else:
        yield path, tree


# Accuracies, token counts and exit steps are ratios of exact counts and must match exactly;
# sums of continuous values (NLL, entropy, expected exit step) may differ in the last bits where
# TP splits reductions differently.
_FLOAT_SUMS = ("nll", "entropy", "mean_reference_entropy", "expected_exit_step")


@pytest.mark.slow
@pytest.mark.parametrize("nproc,flags", [(2, ["--tensor-model-parallel-size", "2"]),
                                         (2, ["--pipeline-model-parallel-size", "2"]),
                                         (2, [])], ids=["tp2", "pp2", "dp2"])
def test_layouts_give_the_single_process_numbers(trained, single_explicit_reference, tmp_path, nproc, flags):
    expected = dict(_numbers(single_explicit_reference[0]["models"]))
    got_report, _ = evaluate(nproc, [*_explicit_reference_args(trained), *flags], tmp_path)
    got = dict(_numbers(got_report["models"]))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key.rsplit(".", 1)[-1] in _FLOAT_SUMS and isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-5), key
        else:
            assert got[key] == value, key
    layout = got_report["layout"]
    assert layout["tensor_model_parallel_size"] * layout["pipeline_model_parallel_size"] * \
        layout["data_parallel_size"] == nproc


# ------------------------------------------------------------------------------------------
# one-line errors naming the flag
# ------------------------------------------------------------------------------------------
def _evaluate_main():
    spec = importlib.util.spec_from_file_location("evaluate_cli", os.path.join(ROOT, EVALUATE))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _error(capsys, argv):
    assert _evaluate_main()(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_errors_name_the_flag(trained, tmp_path, capsys):
    data = ["--data-path", trained["prefix"]]
    assert "--load" in _error(capsys, ["--load", str(tmp_path / "missing"), *data])
    (tmp_path / "empty").mkdir()
    assert "no checkpoint there" in _error(capsys, ["--load", str(tmp_path / "empty"), *data])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "latest_checkpointed_iteration.txt").write_text("garbage")
    assert _error(capsys, ["--load", str(tmp_path / "bad"), *data]).startswith("evaluate.py: error: --load")
    err = _error(capsys, ["--load", trained["ckpt"], "--data-path", str(tmp_path / "nodata")])
    assert err.startswith("evaluate.py: error: --data-path") and "does not exist" in err
    for suffix in (".bin", ".idx"):
        (tmp_path / f"junk{suffix}").write_bytes(b"not an indexed dataset")
    err = _error(capsys, ["--load", trained["ckpt"], "--data-path", str(tmp_path / "junk")])
    assert err.startswith("evaluate.py: error: --data-path") and "not a readable" in err
    assert "--compare" in _error(capsys, ["--load", trained["ckpt"], "--compare", str(tmp_path / "empty")])
    assert "--exit-thresholds" in _error(capsys, ["--load", trained["ckpt"], "--exit-thresholds", "0", "0.5"])
    err = _error(capsys, ["--load", trained["ckpt"], "--difficulty-thresholds", "3", "1"])
    assert "--difficulty-thresholds" in err
    err = _error(capsys, ["--load", trained["ckpt"], "--pipeline-model-parallel-size", "3"])
    assert "--load" in err and "--pipeline-model-parallel-size" in err
