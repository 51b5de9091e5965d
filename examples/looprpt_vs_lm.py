"""LoopRPT against continued LM pre-training from the same stage-1 checkpoint (quickstart data).

    python examples/looprpt_vs_lm.py [--iters 60] [--root runs/quickstart]

Uses the quickstart's data and stage-1 checkpoint (running the quickstart first if they are
missing), continues the stage-1 model for the same number of iterations with (a) the stage-1 LM
objective and (b) LoopRPT, both with a fresh optimizer and the same learning-rate schedule, then
evaluates both on the held-out split with tools/evaluate.py: per-step next-token accuracy on all
tokens and by difficulty (buckets at the 50% and 80% quantiles of the stage-1 model's last-step
entropy: "hard" is the 20% of tokens it is least sure of, as LoopRPT trains on the top 20% by the
teacher's entropy), the average exit step, and accuracy against the average number of loop steps
used (the Q-exit sweep: accuracy at matched inference compute), with each method's median
training iteration time. Writes runs/.../looprpt_vs_lm/report.md and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=60, help="continuation iterations for both methods")
    p.add_argument("--root", default=os.environ.get("LOOPRPT_QUICKSTART_DIR", os.path.join("runs", "quickstart")))
    p.add_argument("--eval-iters", type=int, default=20)
    return p.parse_args()


TRACKER = "latest_checkpointed_iteration.txt"
DIFFICULTY_QUANTILES = ("0.5", "0.8")
# The objective of each method; both continue with the same schedule (continuation_flags).
METHOD_FLAGS = {"lm": [], "looprpt": ["--rl-algo", "looprpt", "--rl-num-rollouts", "4"]}


def continuation_flags(stage1, out, iters, method, save_interval=None):
    """Continue the stage-1 checkpoint for ``iters`` iterations with ``method`` (a METHOD_FLAGS
    key) into ``out``: from the stage-1 weights with a fresh optimizer (--finetune), or, when
    ``out`` already holds a checkpoint of this run (an interrupted one), resuming from it."""
    resume = os.path.exists(os.path.join(out, TRACKER))
    return [
        "--train-iters", str(iters), "--lr", "3e-4", "--min-lr", "3e-5", "--lr-warmup-iters", str(min(5, iters // 2)),
        *(["--load", out] if resume else ["--load", stage1, "--finetune"]),
        "--save", out, *([] if save_interval is None else ["--save-interval", str(save_interval)]),
        "--log-json", os.path.join(out, "log.jsonl"), *METHOD_FLAGS[method],
    ]


def evaluate_command(load, output_dir, eval_iters, compare=None, reference=None, launcher=None, extra=()):
    """tools/evaluate.py's command line (``launcher``: the prefix that starts it, default this
    Python)."""
    return [*(launcher or [sys.executable]), os.path.join(ROOT, "tools", "evaluate.py"), "--load", load,
            *(["--compare", compare] if compare else []), *(["--reference", reference] if reference else []),
            "--eval-iters", str(eval_iters), "--output-dir", output_dir, *extra]


def continue_from_stage1(common, stage1, out, iters, method):
    from megatron_looprpt.arguments import parse_args
    from megatron_looprpt.training.loop import pretrain

    if os.path.exists(os.path.join(out, TRACKER)):
        print(f"[experiment] reusing {out}")
        return
    pretrain(parse_args(common + continuation_flags(stage1, out, iters, method)))


def main():
    a = parse()
    from megatron_looprpt import quickstart

    stage1 = os.path.join(a.root, "stage1")
    if not os.path.exists(os.path.join(stage1, TRACKER)):
        os.environ["LOOPRPT_QUICKSTART_DIR"] = a.root
        quickstart.run_quickstart()
    tokenizer, prefixes = quickstart._prepare_data(a.root)
    common = quickstart._common_flags(tokenizer, prefixes)
    out = os.path.join(a.root, "looprpt_vs_lm")
    lm_dir, rl_dir = os.path.join(out, "lm"), os.path.join(out, "looprpt")
    print(f"[experiment] continued LM pre-training, {a.iters} iterations from {stage1}")
    continue_from_stage1(common, stage1, lm_dir, a.iters, "lm")
    print(f"[experiment] LoopRPT, {a.iters} iterations from {stage1}")
    continue_from_stage1(common, stage1, rl_dir, a.iters, "looprpt")
    from megatron_looprpt import parallel

    parallel.destroy()
    eval_dir = os.path.join(out, "evaluation")
    subprocess.run(evaluate_command(lm_dir, eval_dir, a.eval_iters, compare=rl_dir, reference=stage1,
                                    extra=["--difficulty-quantiles", *DIFFICULTY_QUANTILES]),
                   check=True, env={**os.environ, "PYTHONPATH": ROOT})
    with open(os.path.join(eval_dir, "evaluation.json")) as f:
        evaluation = json.load(f)
    times = {method: median_iteration_time(os.path.join(out, method, "log.jsonl")) for method in ("lm", "looprpt")}
    report = render(evaluation, a.iters, times)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report)
    print(report)


def median_iteration_time(log_path: str) -> float:
    with open(log_path) as f:
        times = sorted(record["iteration_time"] for record in map(json.loads, f) if "iteration_time" in record)
    return times[len(times) // 2]


def render(evaluation: dict, iters: int, times: dict) -> str:
    lm, rl = evaluation["models"]
    names = {"load": "continued LM", "compare": "LoopRPT"}
    difficulty = evaluation["difficulty"]
    thresholds = ", ".join(f"{t:.3f}" for t in difficulty["thresholds"])
    lines = [f"# LoopRPT vs continued LM pre-training ({iters} iterations from the same stage-1 checkpoint)", "",
             f"Held-out tokens: {lm['num_tokens']} (each scored once); difficulty buckets by the stage-1 model's "
             f"last-step entropy at its {' and '.join(DIFFICULTY_QUANTILES)} quantiles ({thresholds} nats): "
             + ", ".join(f"{b} {lm['buckets'][b]['fraction']:.0%}" for b in ("easy", "medium", "hard")), "",
             f"Median training iteration: continued LM {times['lm']:.2f} s, LoopRPT {times['looprpt']:.2f} s "
             f"({times['looprpt'] / times['lm']:.2f}x)", "",
             "| method | step | accuracy (all) | accuracy (hard) | NLL (all) |", "| --- | --- | --- | --- | --- |"]
    for model in (lm, rl):
        for step in model["per_step"]:
            hard = step["by_bucket"]["hard"]["accuracy"]
            lines.append(f"| {names[model['role']]} | {step['step']} | {step['accuracy']:.4f} | "
                         f"{'n/a' if hard is None else f'{hard:.4f}'} | {step['nll']:.4f} |")
    lines += ["", "| method | Q-exit q | avg loop steps | accuracy | expected exit step |", "| --- | --- | --- | --- | --- |"]
    for model in (lm, rl):
        q = model["q_exit"]
        lines.append(f"| {names[model['role']]} | {q['q']} | {q['avg_steps']:.3f} | {q['accuracy']:.4f} | "
                     f"{q['expected_exit_step']:.3f} |")
    lines += ["", "Accuracy against average loop steps (Q-exit sweep):", "",
              "| q | LM steps | LM accuracy | LoopRPT steps | LoopRPT accuracy |", "| --- | --- | --- | --- | --- |"]
    for a, b in zip(lm["q_sweep"], rl["q_sweep"]):
        lines.append(f"| {a['q']} | {a['avg_steps']:.3f} | {a['accuracy']:.4f} | {b['avg_steps']:.3f} | {b['accuracy']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
