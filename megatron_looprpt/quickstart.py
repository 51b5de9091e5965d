"""The embedded default run: `python pretrain_looprpt.py` with no arguments.

Builds a small corpus from text every Python install carries (the standard library's
docstrings and comments) plus a synthetic multi-step reasoning set, trains a SentencePiece
tokenizer, writes megatron indexed datasets, pre-trains a tiny looped model on the CPU
(Ouro stage 1), continues it with LoopRPT from the stage-1 checkpoint, and prints a summary.
Everything lands under ``runs/quickstart`` (or $LOOPRPT_QUICKSTART_DIR); a second run reuses
the data and tokenizer and resumes from the checkpoints it finds.
"""

from __future__ import annotations

import json
import os
import time

from megatron_looprpt.arguments import parse_args
from megatron_looprpt.data.corpus import write_default_corpus
from megatron_looprpt.data.datasets import preprocess_jsonl
from megatron_looprpt.data.tokenizers import train_sentencepiece

VOCAB_SIZE = 4096
STAGE1_ITERS = 300
RL_ITERS = 60


def _prepare_data(root: str) -> tuple:
    data_dir = os.path.join(root, "data")
    tokenizer = os.path.join(data_dir, "tokenizer.model")
    prefixes = [os.path.join(data_dir, f"{name}_text_document") for name in ("text", "reasoning")]
    if all(os.path.exists(p + ".bin") for p in prefixes) and os.path.exists(tokenizer):
        print(f"[quickstart] reusing data in {data_dir}")
        return tokenizer, prefixes
    start = time.time()
    corpus = write_default_corpus(data_dir)
    print(f"[quickstart] corpus: {corpus['num_text_docs']} stdlib documents "
          f"({corpus['text_bytes'] / 1e6:.1f} MB) + {corpus['num_reasoning']} reasoning problems")
    train_sentencepiece([corpus["text_path"], corpus["reasoning_path"]],
                        os.path.join(data_dir, "tokenizer"), vocab_size=VOCAB_SIZE)
    for source, prefix in zip((corpus["text_path"], corpus["reasoning_path"]), prefixes):
        preprocess_jsonl(source, prefix[: -len("_text_document")], "SentencePieceTokenizer",
                         tokenizer, json_keys=("text",), append_eod=True)
    print(f"[quickstart] tokenizer + indexed datasets ready in {time.time() - start:.0f}s")
    return tokenizer, prefixes


def _common_flags(tokenizer: str, prefixes: list) -> list:
    return [
        "--model-size", "tiny",
        "--data-path", "0.7", prefixes[0], "0.3", prefixes[1],
        "--split", "90,10,0",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer,
        "--micro-batch-size", "8", "--global-batch-size", "16",
        "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--clip-grad", "1.0",
        "--eval-iters", "4", "--log-interval", "20", "--seed", "1234",
    ]


def stage1_flags(save_dir: str, iters: int, warmup: int = 20, interval: int = 100) -> list:
    """Stage-1 LM pre-training into ``save_dir``, resuming from it when it holds a checkpoint:
    checkpoints (and validation passes) every ``interval`` iterations."""
    return [
        "--train-iters", str(iters), "--lr", "3e-3", "--min-lr", "3e-4",
        "--lr-warmup-iters", str(warmup), "--eval-interval", str(interval),
        "--save", save_dir, "--load", save_dir, "--save-interval", str(interval),
        "--log-json", os.path.join(save_dir, "log.jsonl"),
    ]


def _last_record(json_path: str) -> dict:
    last, valid = {}, {}
    with open(json_path) as f:
        for line in f:
            record = json.loads(line)
            if "validation" in record:
                valid = record["validation"]
            else:
                last = record
    return {"train": last, "validation": valid}


def run_quickstart() -> dict:
    from megatron_looprpt.training.loop import pretrain

    root = os.environ.get("LOOPRPT_QUICKSTART_DIR", os.path.join("runs", "quickstart"))
    tokenizer, prefixes = _prepare_data(root)
    common = _common_flags(tokenizer, prefixes)
    stage1_dir = os.path.join(root, "stage1")
    rl_dir = os.path.join(root, "looprpt")
    start = time.time()
    print(f"[quickstart] stage 1: pre-training a tiny looped model for {STAGE1_ITERS} iterations")
    pretrain(parse_args(common + stage1_flags(stage1_dir, STAGE1_ITERS)))
    stage1_time = time.time() - start

    start = time.time()
    print(f"[quickstart] LoopRPT: {RL_ITERS} iterations of reinforcement pre-training from the stage-1 checkpoint")
    # A first run starts from the stage-1 weights (fresh optimizer, iteration 0); a rerun resumes
    # the LoopRPT run itself.
    resume = os.path.exists(os.path.join(rl_dir, "latest_checkpointed_iteration.txt"))
    pretrain(parse_args(common + [
        "--rl-algo", "looprpt", "--rl-num-rollouts", "4", "--rl-latent-noise-std", "0.1",
        "--train-iters", str(RL_ITERS), "--lr", "3e-4", "--min-lr", "3e-5",
        "--lr-warmup-iters", "5", "--eval-interval", str(RL_ITERS),
        "--load", rl_dir if resume else stage1_dir, *([] if resume else ["--finetune"]),
        "--save", rl_dir, "--save-interval", str(RL_ITERS // 2),
        "--log-json", os.path.join(rl_dir, "log.jsonl"),
    ]))
    summary = {
        "stage1": _last_record(os.path.join(stage1_dir, "log.jsonl")),
        "stage1_seconds": stage1_time,
        "looprpt": _last_record(os.path.join(rl_dir, "log.jsonl")),
        "looprpt_seconds": time.time() - start,
    }
    _print_summary(summary, stage1_dir, rl_dir)
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def loop_verdict(step_loss: list) -> str:
    """Whether the loop steps help, from held-out cross entropy per loop step."""
    if len(step_loss) < 2:
        return "one loop step: nothing to compare"
    changes = [b - a for a, b in zip(step_loss, step_loss[1:])]
    steps = " ".join(f"{x:.3f}" for x in step_loss)
    if all(change <= 0 for change in changes):
        return f"the loops help: held-out loss falls with every loop step ({steps})"
    best = min(range(len(step_loss)), key=step_loss.__getitem__) + 1
    if best == 1:
        return f"the loops do not help: loop step 1 has the lowest held-out loss ({steps})"
    return f"the loops help up to step {best}, after which held-out loss rises ({steps})"


def _print_summary(summary: dict, stage1_dir: str, rl_dir: str) -> None:
    train = summary["stage1"]["train"]
    valid = summary["stage1"]["validation"]
    print("\n[quickstart] summary")
    print(f"  stage 1 ({summary['stage1_seconds']:.0f}s): train lm loss {train.get('lm_loss', float('nan')):.3f}, "
          f"per-step loss {[round(x, 3) for x in train.get('step_loss', [])]}, "
          f"expected exit step {train.get('exit_step', float('nan')):.2f}")
    if valid:
        print(f"  validation: lm loss {valid['lm_loss']:.3f} (ppl {valid['ppl']:.1f}; the expected cross entropy "
              f"under the exit distribution), per-step loss {[round(x, 3) for x in valid['step_loss']]}")
        print(f"  {loop_verdict(valid['step_loss'])}")
    rl_train = summary["looprpt"]["train"]
    rl_valid = summary["looprpt"]["validation"]
    print(f"  LoopRPT ({summary['looprpt_seconds']:.0f}s): reward {rl_train.get('reward_mean', float('nan')):.4f}, "
          f"pg loss {rl_train.get('pg_loss', float('nan')):.4f}, kl {rl_train.get('kl_loss', float('nan')):.4f}, "
          f"student exit step {rl_train.get('student_exit_step', float('nan')):.2f}, "
          f"teacher t_ref {rl_train.get('teacher_t_ref', float('nan')):.2f}, "
          f"hard tokens {100 * rl_train.get('hard_token_fraction', float('nan')):.0f}%")
    if rl_valid:
        print(f"  validation after LoopRPT: lm loss {rl_valid['lm_loss']:.3f} (ppl {rl_valid['ppl']:.1f}), "
              f"per-step loss {[round(x, 3) for x in rl_valid['step_loss']]}")
        print(f"  {loop_verdict(rl_valid['step_loss'])}")
    print(f"  checkpoints: {stage1_dir} (stage 1), {rl_dir} (LoopRPT)")
