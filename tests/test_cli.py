"""End-to-end runs of pretrain_looprpt.py as a user runs it: real indexed data, 1/2/4 processes,
checkpoints, resume, LoopRPT from a stage-1 checkpoint."""

import json
import os
import subprocess
import sys

import pytest

from tests.torchrun import ROOT, run

TOOLS = os.path.join(ROOT, "tools")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small real dataset: stdlib text + reasoning problems, a SentencePiece tokenizer, .bin/.idx."""
    from megatron_looprpt.data.corpus import write_default_corpus

    root = tmp_path_factory.mktemp("corpus")
    paths = write_default_corpus(str(root), max_text_bytes=300_000, num_reasoning=1500)
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, os.path.join(TOOLS, "train_tokenizer.py"), "--input",
                    paths["text_path"], paths["reasoning_path"], "--vocab-size", "512",
                    "--output-prefix", str(root / "tok")], check=True, env=env, capture_output=True)
    prefixes = []
    for name in ("text", "reasoning"):
        subprocess.run([sys.executable, os.path.join(TOOLS, "preprocess_data.py"), "--input",
                        str(root / f"{name}.jsonl"), "--output-prefix", str(root / name),
                        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                        str(root / "tok.model"), "--append-eod", "--workers", "2"],
                       check=True, env=env, capture_output=True)
        prefixes.append(str(root / f"{name}_text_document"))
    return {"tokenizer": str(root / "tok.model"), "prefixes": prefixes}


def flags(corpus, *extra):
    return [
        "--model-size", "tiny", "--seq-length", "64", "--num-layers", "2",
        "--data-path", "0.6", corpus["prefixes"][0], "0.4", corpus["prefixes"][1], "--split", "90,8,2",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", corpus["tokenizer"],
        "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "2e-3", "--min-lr", "2e-4",
        "--lr-warmup-iters", "1", "--lr-decay-iters", "6", "--log-interval", "1", "--no-progress-bar",
        "--seed", "3", *extra,
    ]


def records(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "validation" not in r], [r["validation"] for r in rows if "validation" in r]


def launch(nproc, argv, timeout=600):
    result = run("pretrain_looprpt.py", nproc, argv, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", [
    (1, []),
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
         "--use-distributed-optimizer"]),
])
def test_pretrain_end_to_end(corpus, tmp_path, nproc, layout):
    log = tmp_path / "log.jsonl"
    result = launch(nproc, flags(corpus, "--train-iters", "6", "--eval-interval", "3", "--eval-iters", "1",
                                 "--save", str(tmp_path / "ckpt"), "--save-interval", "3",
                                 "--log-json", str(log), *layout))
    train, valid = records(log)
    assert [r["iteration"] for r in train] == list(range(1, 7))
    for r in train:
        assert len(r["step_loss"]) == 4 and 1.0 <= r["exit_step"] <= 4.0
        assert r["tokens_per_sec"] > 0 and r["grad_norm"] > 0
    assert train[-1]["lm_loss"] < train[0]["lm_loss"]
    assert len(valid) == 2
    assert os.path.exists(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt")
    assert "iteration      6/6" in result.stdout


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(corpus, tmp_path):
    full, resumed = tmp_path / "full.jsonl", tmp_path / "resumed.jsonl"
    launch(2, flags(corpus, "--train-iters", "6", "--log-json", str(full),
                    "--tensor-model-parallel-size", "2"))
    ckpt = str(tmp_path / "ckpt")
    # saved in the background (iteration 2, then the final 3, each published when written)
    launch(2, flags(corpus, "--train-iters", "3", "--save", ckpt, "--save-interval", "2", "--async-save",
                    "--log-json", str(resumed), "--tensor-model-parallel-size", "2"))
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "iter_0000003", "latest_checkpointed_iteration.txt"]
    launch(2, flags(corpus, "--train-iters", "6", "--load", ckpt, "--save", ckpt,
                    "--log-json", str(resumed), "--tensor-model-parallel-size", "2"))
    expected, _ = records(full)
    got, _ = records(resumed)
    assert [r["iteration"] for r in got] == list(range(1, 7))
    for e, g in zip(expected, got):
        assert e["lm_loss"] == g["lm_loss"] and e["grad_norm"] == g["grad_norm"]


@pytest.mark.slow
def test_looprpt_from_a_stage1_checkpoint_and_its_resume(corpus, tmp_path):
    stage1 = str(tmp_path / "stage1")
    launch(1, flags(corpus, "--train-iters", "2", "--save", stage1))
    rl_flags = ["--rl-algo", "looprpt", "--rl-num-rollouts", "4", "--rl-hard-token-ratio", "0.5"]
    full, resumed = tmp_path / "full.jsonl", tmp_path / "resumed.jsonl"
    launch(2, flags(corpus, *rl_flags, "--train-iters", "4", "--load", stage1, "--finetune",
                    "--log-json", str(full)))
    rl_ckpt = str(tmp_path / "rl")
    launch(2, flags(corpus, *rl_flags, "--train-iters", "2", "--load", stage1, "--finetune",
                    "--save", rl_ckpt, "--log-json", str(resumed)))
    launch(2, flags(corpus, *rl_flags, "--train-iters", "4", "--load", rl_ckpt, "--save", rl_ckpt,
                    "--log-json", str(resumed)))
    expected, _ = records(full)
    got, _ = records(resumed)
    assert len(got) == 4
    for e, g in zip(expected, got):
        for key in ("lm_loss", "grad_norm", "reward_mean", "pg_loss", "kl_loss", "teacher_t_ref",
                    "hard_token_fraction"):
            assert e[key] == g[key], key
    assert expected[0]["kl_loss"] == 0.0 and expected[-1]["kl_loss"] > 0.0


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "rltt", "rpt"])
def test_token_level_rl_from_a_stage1_checkpoint_and_its_resume(corpus, tmp_path, algo):
    """--rl-algo grpo/rltt on the generated prompt set, rpt on the corpus, DP=2: the log's
    fields, and a resumed run (reference model, prompt cursor, sampling seeds restored) repeats
    the uninterrupted one."""
    stage1 = str(tmp_path / "stage1")
    launch(1, flags(corpus, "--train-iters", "2", "--save", stage1))
    rl_flags = ["--rl-algo", algo, "--grpo-num-samples", "4", "--max-new-tokens", "12",
                "--micro-batch-size", "4", "--global-batch-size", "8", "--num-generated-prompts", "50"]
    full, resumed = tmp_path / "full.jsonl", tmp_path / "resumed.jsonl"
    launch(2, flags(corpus, *rl_flags, "--train-iters", "3", "--load", stage1, "--finetune",
                    "--log-json", str(full)))
    rl_ckpt = str(tmp_path / "rl")
    launch(2, flags(corpus, *rl_flags, "--train-iters", "2", "--load", stage1, "--finetune",
                    "--save", rl_ckpt, "--log-json", str(resumed)))
    result = launch(2, flags(corpus, *rl_flags, "--train-iters", "3", "--load", rl_ckpt, "--save", rl_ckpt,
                             "--log-json", str(resumed)))
    expected, _ = records(full)
    got, _ = records(resumed)
    assert [r["iteration"] for r in got] == [1, 2, 3]
    for e, g in zip(expected, got):
        assert set(e) >= {"reward_mean", "answer_length", "pg_loss", "kl", "grad_norm", "lr"}
        for key in ("reward_mean", "answer_length", "pg_loss", "kl", "grad_norm", "lr"):
            assert e[key] == g[key], key
        assert 1 <= e["answer_length"] <= 12 and 0 <= e["reward_mean"] <= 1
    assert "reward mean" in result.stdout and "iteration      3/3" in result.stdout


@pytest.mark.slow
def test_load_of_another_shape_fails_before_building(corpus, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    launch(1, flags(corpus, "--train-iters", "1", "--save", ckpt))
    result = run("pretrain_looprpt.py", 1, flags(corpus, "--train-iters", "2", "--load", ckpt,
                                                 "--hidden-size", "256", "--num-attention-heads", "8"))
    assert result.returncode != 0
    assert "--hidden-size 256 but the checkpoint has 128" in result.stderr
    assert "looped model:" not in result.stdout
