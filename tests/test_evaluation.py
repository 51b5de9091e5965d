"""Evaluation: the metrics on hand-built inputs with known answers (partial loss masks, saturated
gates, entropy quantiles), the held-out split's size against megatron's dataset, then
tools/evaluate.py end to end on a real indexed dataset and a checkpoint trained by
pretrain_looprpt.py, in one process and under TP=2, PP=2 and DP=2 (the same numbers, with fixed
and with quantile difficulty thresholds), plus its one-line errors."""

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
from megatron_looprpt.models.exit_gate import exit_distribution, q_exit_steps
from tests.scripts import load_script
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


def _partially_masked_batch():
    """T=2 steps, 5 tokens, the last one masked out with values that would change every sum.
    Gates +40 / -40 / 0 give exit distributions (1, 0), (0, 1), (1/2, 1/2) up to e^-40."""
    labels = torch.tensor([[1, 2, 3, 4, 5]])
    predictions = torch.tensor([[[1, 0, 3, 0, 5]], [[1, 2, 0, 4, 5]]])  # right: 1 0 1 0 (1) / 1 1 0 1 (1)
    label_logprobs = torch.log(torch.tensor([[[1 / 2, 1 / 4, 1 / 2, 1 / 8, 1 / 16]],
                                             [[1 / 4, 1 / 2, 1 / 4, 1 / 2, 1 / 16]]]))
    entropy = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 10.0]], [[0.5, 1.0, 1.5, 2.0, 10.0]]])
    gate_logits = torch.tensor([[[40.0, -40.0, 0.0, -40.0, -40.0]], [[0.0] * 5]])
    reference_entropy = torch.tensor([[0.5, 2.0, 5.0, 4.0, 6.0]])     # easy, medium, hard, hard, (hard)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    return labels, mask, label_logprobs, predictions, entropy, gate_logits, reference_entropy


# q=0.4 rather than 0.5: the lambda=1/2 token's CDF after step 1 is 1/2 only up to rounding.
MASKED_SPEC = MetricSpec(exit_thresholds=(0.4, 1.0), default_threshold=0.4, difficulty_thresholds=(1.0, 3.0))


def test_token_sums_with_a_partial_mask_known_answers():
    sums = metrics.token_sums(*_partially_masked_batch(), MASKED_SPEC)
    ln2 = math.log(2)
    assert sums["tokens"].tolist() == [4.0]
    assert sums["step_correct"].tolist() == [2.0, 3.0]
    assert sums["step_nll"].tolist() == pytest.approx([7 * ln2, 6 * ln2])   # ln 2+4+2+8, ln 4+2+4+2
    assert sums["step_entropy"].tolist() == pytest.approx([10.0, 5.0])
    assert sums["bucket_tokens"].tolist() == [1.0, 1.0, 2.0]
    assert sums["bucket_reference_entropy"].tolist() == pytest.approx([0.5, 2.0, 9.0])
    assert sums["bucket_step_correct"].tolist() == [[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]]
    assert torch.allclose(sums["bucket_step_nll"], torch.tensor([[1.0, 2.0], [2.0, 1.0], [4.0, 3.0]]) * ln2)
    # q=0.4: tokens exit after 1, 2, 1, 2 steps, each at a right prediction; q=1: 2 steps each.
    assert sums["sweep_correct"].tolist() == [4.0, 3.0]
    assert sums["sweep_steps"].tolist() == [6.0, 8.0]
    assert sums["exit_correct"].tolist() == [1.0, 1.0, 2.0]
    assert sums["exit_steps"].tolist() == [1.0, 2.0, 3.0]
    assert sums["exit_expected_step"].tolist() == pytest.approx([1.0, 2.0, 3.5])


def test_summarize_with_a_partial_mask_known_answers():
    summary = metrics.summarize(metrics.token_sums(*_partially_masked_batch(), MASKED_SPEC), MASKED_SPEC)
    ln2 = math.log(2)
    assert summary["num_tokens"] == 4
    assert [s["entropy"] for s in summary["per_step"]] == pytest.approx([2.5, 1.25])
    assert [s["nll"] for s in summary["per_step"]] == pytest.approx([7 * ln2 / 4, 6 * ln2 / 4])
    assert [s["by_bucket"]["hard"]["nll"] for s in summary["per_step"]] == pytest.approx([2 * ln2, 1.5 * ln2])
    assert [s["by_bucket"]["medium"]["nll"] for s in summary["per_step"]] == pytest.approx([2 * ln2, ln2])
    assert [summary["buckets"][b]["mean_reference_entropy"] for b in metrics.BUCKETS] == pytest.approx([0.5, 2.0, 4.5])
    assert summary["buckets"]["hard"]["avg_exit_steps"] == 1.5
    assert [p["avg_steps"] for p in summary["q_sweep"]] == [1.5, 2.0]
    assert summary["q_exit"]["expected_exit_step"] == pytest.approx(6.5 / 4)


def test_q_exit_at_one_runs_to_the_last_step_when_the_gate_saturates():
    """A gate logit of 40 makes the exit CDF exactly 1.0 (in float64) after step 1: q < 1 exits
    there, q = 1 still runs every step."""
    labels = torch.tensor([[1, 2]])
    predictions = torch.tensor([[[1, 0]], [[0, 0]], [[1, 2]]])          # T=3: right at step 1 and 3
    gate_logits = torch.full((3, 1, 2), 40.0)
    probs = exit_distribution(gate_logits.double())
    assert torch.cumsum(probs, dim=0)[0].tolist() == [[1.0, 1.0]]
    assert q_exit_steps(probs, 1.0).tolist() == [[2, 2]]
    assert q_exit_steps(probs, 0.999).tolist() == [[0, 0]]
    spec = MetricSpec(exit_thresholds=(0.3, 0.6, 1.0), default_threshold=1.0)
    batch = (labels, torch.ones(1, 2), torch.zeros(3, 1, 2), predictions, torch.zeros(3, 1, 2), gate_logits,
             torch.zeros(1, 2))
    summary = metrics.summarize(metrics.token_sums(*batch, spec), spec)
    assert [(p["avg_steps"], p["accuracy"]) for p in summary["q_sweep"]] == [(1.0, 0.5), (1.0, 0.5), (3.0, 1.0)]
    assert (summary["q_exit"]["avg_steps"], summary["q_exit"]["accuracy"]) == (3.0, 1.0)
    # One frontier entry per distinct point, naming every q (and fixed depth) that reaches it;
    # fixed depth 2 (2 steps, accuracy 0) is dominated.
    assert summary["pareto_frontier"] == [
        {"label": "q=0.3,0.6 / fixed 1", "q": [0.3, 0.6], "avg_steps": 1.0, "accuracy": 0.5},
        {"label": "q=1 / fixed 3", "q": [1.0], "avg_steps": 3.0, "accuracy": 1.0},
    ]


def test_entropy_quantiles_interpolate_between_order_statistics():
    values = torch.tensor([7.0, 3.0, 10.0, 0.0, 5.0, 1.0, 9.0, 2.0, 8.0, 4.0, 6.0])   # 0..10 shuffled
    assert metrics.entropy_quantiles(values, (0.5, 0.8)) == pytest.approx((5.0, 8.0))
    assert metrics.entropy_quantiles(values, (0.0, 1.0)) == (0.0, 10.0)
    # Between order statistics: 0.25 of the way from the 2nd to the 3rd of 1, 2, 3, 4 (and 2D input).
    assert metrics.entropy_quantiles(torch.tensor([[4.0, 1.0], [3.0, 2.0]]), (0.5, 0.75)) == pytest.approx((2.5, 3.25))
    assert metrics.entropy_quantiles(torch.tensor([2.0]), (0.2, 0.9)) == (2.0, 2.0)
    with pytest.raises(ValueError):
        metrics.entropy_quantiles(torch.tensor([]), (0.5,))


def test_pareto_frontier():
    points = [(1, 0.5), (2, 0.7), (2, 0.6), (3, 0.7), (1, 0.5), (0.5, 0.2)]
    # (2, 0.6) and (3, 0.7) are dominated by (2, 0.7); the two equal points dominate neither.
    assert metrics.pareto_frontier(points) == [5, 0, 4, 1]
    assert metrics.pareto_frontier([]) == []


# ------------------------------------------------------------------------------------------
# held-out sequences: what megatron's GPTDataset gives before it repeats a document
# ------------------------------------------------------------------------------------------
def _unique_token_prefix(root, name, num_docs, first_token):
    """Documents of 10 tokens each, every token id used once in the whole dataset (no eod)."""
    from megatron_looprpt.data.datasets import preprocess_jsonl

    path = root / f"{name}.jsonl"
    with open(path, "w") as f:
        for d in range(num_docs):
            ids = range(first_token + 10 * d, first_token + 10 * d + 10)
            f.write(json.dumps({"text": " ".join(map(str, ids))}) + "\n")
    return preprocess_jsonl(str(path), str(root / name), "NullTokenizer", vocab_size=4096, append_eod=False)["text"]


def _valid_split(data_path, num_samples):
    from megatron_looprpt.data.datasets import build_datasets
    from megatron_looprpt.data.tokenizers import build_tokenizer

    return build_datasets(data_path, "50,50,0", 8, 1234, build_tokenizer("NullTokenizer", None, 4096),
                          num_samples=(1, num_samples, 1))[1]


def _epochs(gpt_dataset, docs_in_split):
    return len(gpt_dataset.document_index) / docs_in_split


def test_split_sequences_is_one_epoch_of_megatrons_dataset(tmp_path):
    from megatron_looprpt.data.datasets import split_sequences

    def held_out_sequences(data_path, split, name, seq_length):
        return split_sequences(data_path, split, 1 if name == "valid" else 2, seq_length)

    a = _unique_token_prefix(tmp_path, "a", 40, first_token=0)       # valid split: 20 docs, 200 tokens
    b = _unique_token_prefix(tmp_path, "b", 20, first_token=1000)    # valid split: 10 docs, 100 tokens
    # 200 tokens, one of them read past the last sequence of 8: 24 sequences.
    assert held_out_sequences([a], "50,50,0", "valid", 8) == 24
    one_epoch = _valid_split([a], 24)
    tokens = torch.cat([one_epoch[i]["tokens"] for i in range(24)])
    assert _epochs(one_epoch, 20) == 1 and len(set(tokens.tolist())) == 24 * 8
    assert _epochs(_valid_split([a], 25), 20) == 2                    # one more starts over
    # A 0.7/0.3 blend asks each dataset for ceil(ceil(0.7 N) * 1.005) and ceil(ceil(0.3 N) * 1.005)
    # sequences; a holds 24, b 12: N = 32 (23 -> 24 and 10 -> 11), N = 33 would take 25 of a.
    blend = ["0.7", a, "0.3", b]
    assert held_out_sequences(blend, "50,50,0", "valid", 8) == 32
    blended = _valid_split(blend, 32)
    assert [_epochs(d, n) for d, n in zip(blended.datasets, (20, 10))] == [1, 1]
    tokens = torch.cat([blended[i]["tokens"] for i in range(32)])
    assert len(set(tokens.tolist())) == 32 * 8
    assert _epochs(_valid_split(blend, 33).datasets[0], 20) == 2
    # Without weights megatron takes one epoch of each.
    assert held_out_sequences([a, b], "50,50,0", "valid", 8) == 24 + 12


def test_training_validation_is_capped_at_the_valid_split_too(tmp_path, capsys):
    import argparse

    from megatron_looprpt.training.loop import _validation_batches

    a = _unique_token_prefix(tmp_path, "a", 40, first_token=0)       # valid split: 24 sequences of 8
    args = argparse.Namespace(data_path=[a], split="50,50,0", seq_length=8, eval_iters=10,
                              global_batch_size=4, eval_interval=5, mock_data=False)
    assert _validation_batches(args) == 6
    assert "--eval-iters 10 asks for 40 sequences, the valid split of --split 50,50,0 holds 24: " \
           "validating on 6 batches" in capsys.readouterr().out
    args.eval_iters = 3
    assert _validation_batches(args) == 3 and capsys.readouterr().out == ""
    args.split = "100,0,0"
    assert _validation_batches(args) == 0                            # no valid share: no validation


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
         # Ouro's loss: the model whose entropies fill all three fixed buckets below
         "--step-loss-weights", "exit",
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


def _quantile_args(trained):
    # --eval-iters 100 asks for 800 sequences: more than the valid split holds.
    return ["--load", trained["ckpt"], "--compare", trained["early"], "--eval-iters", "100",
            "--difficulty-quantiles", "0.3", "0.7"]


@pytest.fixture(scope="module")
def single_quantiles(trained, tmp_path_factory):
    """One process, difficulty by quantiles, more batches asked for than the split holds."""
    return evaluate(1, _quantile_args(trained), tmp_path_factory.mktemp("single_quantiles"))


def _valid_sequences(prefix, seq_length=32):
    """Sequences of 32 tokens in the 80,10,10 split's valid documents (240-269 of 300), less the
    one token read past the last sequence."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(prefix)
    return (int(indexed.sequence_lengths[240:270].sum()) - 1) // seq_length


def test_report_fields_and_console_table(single, trained):
    report, stdout = single
    assert report["schema"] == "megatron_looprpt.evaluation/1"
    assert report["data"]["split_name"] == "valid" and report["data"]["global_batch_size"] == 8
    assert report["data"]["eval_iters"] == report["data"]["evaluated_batches"] == 3
    assert report["data"]["split_sequences"] == _valid_sequences(trained["prefix"])
    assert "capped" not in stdout and "asks for" not in stdout
    assert report["difficulty"]["quantiles"] is None
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


def test_eval_iters_capped_at_the_split_and_quantile_buckets(single_quantiles, trained):
    report, stdout = single_quantiles
    held = _valid_sequences(trained["prefix"])
    batches = held // 8
    assert 1 <= batches < 100
    assert (f"--eval-iters 100 asks for 800 sequences, the valid split of --split 80,10,10 holds {held}: "
            f"evaluating {batches} batches") in stdout
    data = report["data"]
    assert (data["eval_iters"], data["evaluated_batches"], data["split_sequences"]) == (100, batches, held)
    difficulty = report["difficulty"]
    assert difficulty["quantiles"] == [0.3, 0.7]
    t1, t2 = difficulty["thresholds"]
    assert 0.0 < t1 < t2
    assert difficulty["buckets"]["hard"] == f"{t2:.4g} <= H"
    load, compare = report["models"]
    tokens = batches * 8 * 32
    assert load["num_tokens"] == compare["num_tokens"] == tokens
    assert difficulty["bucket_tokens"] == {b: load["buckets"][b]["tokens"] for b in metrics.BUCKETS}
    # Quantiles of the evaluated tokens' entropies: 30% / 40% / 30% of them, to a token or two.
    for bucket, share in (("easy", 0.3), ("medium", 0.4), ("hard", 0.3)):
        assert abs(load["buckets"][bucket]["fraction"] - share) <= 2 / tokens, bucket
        assert compare["buckets"][bucket]["tokens"] == load["buckets"][bucket]["tokens"]
    assert load["buckets"]["easy"]["mean_reference_entropy"] < t1 <= load["buckets"]["medium"]["mean_reference_entropy"]
    assert f"{batches} x 8 sequences of 32 tokens (--eval-iters 100 capped" in stdout
    assert "thresholds quantiles 0.3, 0.7 = " in stdout


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
_FLOAT_SUMS = ("nll", "entropy", "mean_reference_entropy", "expected_exit_step", "lm_loss", "ppl")


@pytest.mark.slow
@pytest.mark.parametrize("nproc,flags,quantiles", [(2, ["--tensor-model-parallel-size", "2"], False),
                                                   (2, ["--pipeline-model-parallel-size", "2"], False),
                                                   (2, [], False),
                                                   (2, ["--pipeline-model-parallel-size", "2"], True),
                                                   (2, [], True)],
                         ids=["tp2", "pp2", "dp2", "pp2-quantiles", "dp2-quantiles"])
def test_layouts_give_the_single_process_numbers(trained, request, tmp_path, nproc, flags, quantiles):
    """``quantiles``: difficulty by quantiles over more batches than the split holds, so the
    entropies are gathered over DP ranks, the thresholds shared with every pipeline stage and
    the batch count capped alike on every rank."""
    single_report = request.getfixturevalue("single_quantiles" if quantiles else "single_explicit_reference")[0]
    argv = _quantile_args(trained) if quantiles else _explicit_reference_args(trained)
    got_report, _ = evaluate(nproc, [*argv, *flags], tmp_path)
    assert got_report["data"] == single_report["data"]
    assert got_report["difficulty"]["thresholds"] == pytest.approx(single_report["difficulty"]["thresholds"], rel=1e-6)
    expected = dict(_numbers(single_report["models"]))
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
    return load_script(EVALUATE, "evaluate_cli").main


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
    assert "--difficulty-quantiles" in _error(capsys, ["--load", trained["ckpt"], "--difficulty-quantiles", "0.8", "0.5"])
    with pytest.raises(SystemExit):   # argparse: one or the other
        _evaluate_main()(["--load", trained["ckpt"], "--difficulty-quantiles", "0.5", "0.8",
                          "--difficulty-thresholds", "1", "3"])
    assert "not allowed with" in capsys.readouterr().err
    err = _error(capsys, ["--load", trained["ckpt"], "--data-path"])
    assert err.startswith("evaluate.py: error: --data-path") and "mock" not in err
    err = _error(capsys, ["--load", trained["ckpt"], "--global-batch-size", "64"])   # the split holds < 64
    assert all(flag in err for flag in ("--eval-iters", "--global-batch-size", "--split"))
    assert "no documents" in _error(capsys, ["--load", trained["ckpt"], "--split", "90,0,10"])
    err = _error(capsys, ["--load", trained["ckpt"], "--pipeline-model-parallel-size", "3"])
    assert "--load" in err and "--pipeline-model-parallel-size" in err
