"""LoopRPT against continued LM pre-training, from stage-1 models that use their loops.

    bash examples/looprpt_vs_lm.sh        # = python examples/looprpt_vs_lm.py (docs/studies.md: results, wall time)
    python examples/looprpt_vs_lm.py --iters 100 --seeds 1 2 3 --out runs/looprpt_vs_lm

Stage 1 is the depth study's looped model on the composition task (examples/depth_study.py,
``task/nN_1200it/loop/seedS`` with N = ``--num-layers``, 2 by default: the models docs/studies.md's
table was measured from; run first when missing): a model whose later loop steps solve longer
chains. From each seed's stage-1 checkpoint, with a fresh optimizer and the same schedule and
tokens, three continuations:
- ``lm``: the stage-1 objective (the depth study's task flags);
- ``looprpt``: LoopRPT with its defaults (the authors' algorithm: the policy gradient through the
  noisy latents, summed over rollouts; docs/looprpt.md);
- ``looprpt-gate-only``: LoopRPT with ``--rl-pg-gate-only`` (the ablation: the policy gradient
  trains the exit gate alone).
Each method's learning rate is chosen first by a small sweep on seed 1 (``--lr-sweep``, scored
by the lm loss of the validation split); the sweep is reported. Every continuation is then
evaluated with tools/evaluate.py on held-out data: the task's valid split (its answer tokens:
accuracy per loop step, the hard 20% by the stage-1 model's entropy, the Q-exit sweep and its
Pareto frontier) and the task's held-out walks (accuracy per loop step and per hops k). The table
gives means and standard deviations over seeds and calls a difference a gain only beyond two
standard deviations (of the paired differences: each seed's methods share its stage 1).
Finished stages are skipped on a rerun. Output: ``report.md``, ``report.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import depth_study  # noqa: E402  (examples/depth_study.py: stage 1 and the task's data)

TRACKER = "latest_checkpointed_iteration.txt"
DIFFICULTY_QUANTILES = ("0.5", "0.8")
# The objective of each method; all continue with the same schedule (continuation_flags).
METHOD_FLAGS = {"lm": [], "looprpt": ["--rl-algo", "looprpt"],
                "looprpt-gate-only": ["--rl-algo", "looprpt", "--rl-pg-gate-only"]}
LR_SWEEP = (1e-4, 3e-4, 1e-3)


def continuation_flags(stage1, out, iters, method, save_interval=None, lr=3e-4):
    """Continue the stage-1 checkpoint for ``iters`` iterations with ``method`` (a METHOD_FLAGS
    key) into ``out``: from the stage-1 weights with a fresh optimizer (--finetune), or, when
    ``out`` already holds a checkpoint of this run (an interrupted one), resuming from it."""
    resume = os.path.exists(os.path.join(out, TRACKER))
    return [
        "--train-iters", str(iters), "--lr", f"{lr:g}", "--min-lr", f"{lr / 10:g}",
        "--lr-warmup-iters", str(min(5, iters // 2)),
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


def _log(message: str) -> None:
    print(f"[looprpt-vs-lm] {message}", flush=True)


def _finished(save_dir: str, iters: int) -> bool:
    return (depth_study.trained_iteration(save_dir) or 0) >= iters


def continue_stage1(cfg, task_flags: List[str], stage1: str, out: str, method: str, lr: float, seed: int,
                    threads=None) -> None:
    if _finished(out, cfg.iters):
        return
    _log(f"{method} lr {lr:g} seed {seed}: {cfg.iters} iterations from {stage1}")
    start = time.time()
    arm = depth_study.Arm("loop", "", cfg.num_layers, cfg.loop_steps)
    flags = depth_study.train_flags(task_flags, arm, seed, cfg.iters, out)
    # the continuation's own schedule and checkpoints replace stage 1's (argparse keeps the last)
    flags += continuation_flags(stage1, out, cfg.iters, method, lr=lr) + ["--eval-interval", str(cfg.iters),
                                                                            "--eval-iters", "4"]
    depth_study._run([sys.executable, os.path.join(ROOT, "pretrain_looprpt.py"), *flags], os.path.join(out, "train.log"),
                     threads)
    _log(f"{method} lr {lr:g} seed {seed}: trained in {time.time() - start:.0f}s")


def validation_loss(out: str) -> float:
    """The lm loss of the last validation pass in a run's log."""
    last = None
    with open(os.path.join(out, "log.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "validation" in record:
                last = record["validation"]["lm_loss"]
    return last


def evaluate(cfg, info: dict, load: str, stage1: str, out: str, threads=None) -> dict:
    report = os.path.join(out, "evaluation.json")
    if not os.path.exists(report):
        partial = out + ".partial"
        if os.path.exists(partial):
            shutil.rmtree(partial)
        depth_study._run(evaluate_command(load, partial, cfg.eval_iters, reference=stage1,
                                          extra=["--difficulty-quantiles", *DIFFICULTY_QUANTILES,
                                                 "--task-data", info["heldout"]]),
                         os.path.join(os.path.dirname(out), "eval.log"), threads)
        os.replace(partial, out)
    with open(report) as f:
        return json.load(f)["models"][0]


def _cell(values: List[float]) -> str:
    mean, std = depth_study.mean_std(values)
    return f"{mean:.4f} ± {std:.4f}"


def _vs(values: List[float], base: List[float]) -> str:
    """The paired difference of means, called a gain or loss only beyond two standard deviations."""
    diffs = [a - b for a, b in zip(values, base)]
    mean, std = depth_study.mean_std(diffs)
    verdict = "gain" if mean > 2 * std else ("loss" if mean < -2 * std else "within noise")
    return f"{mean:+.4f} ± {std:.4f} ({verdict})"


def render(cfg, sweep: Dict[str, Dict[float, float]], chosen: Dict[str, float], models: Dict[str, List[dict]],
           times: Dict[str, float], wall: float) -> str:
    steps = cfg.loop_steps
    lines = [f"# LoopRPT vs continued LM pre-training ({cfg.iters} iterations of 16 x 128 tokens from each seed's "
             "depth-study stage-1 model)", "",
             f"Seeds {', '.join(map(str, cfg.seeds))}; mean ± std over seeds; a difference from continued LM is the "
             "mean of the paired (same-seed) differences, a gain or loss only beyond two of their standard "
             f"deviations. Wall time {wall / 60:.0f} min (two runs at a time on 2 CPU cores).", "",
             "Learning-rate sweep (seed 1, validation lm loss after the continuation):", "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in cfg.lr_sweep) + " | chosen |",
             "| --- |" + " --- |" * (len(cfg.lr_sweep) + 1)]
    for method, losses in sweep.items():
        lines.append(f"| {method} | " + " | ".join(f"{losses[lr]:.4f}" for lr in cfg.lr_sweep) + f" | {chosen[method]:g} |")
    lines += ["", "Median training iteration: " + ", ".join(f"{m} {t:.2f} s" for m, t in times.items()), ""]
    lm = models["lm"]
    header = " | ".join(f"step {t + 1}" for t in range(steps))
    lines += ["Held-out walks (the task's valid split, answer tokens): accuracy per loop step, all and hard 20%", "",
              f"| method | tokens | {header} |", "| --- | --- |" + " --- |" * steps]
    for method, runs in models.items():
        for bucket in ("all", "hard"):
            cells = []
            for t in range(steps):
                values = [m["per_step"][t]["accuracy"] if bucket == "all" else m["per_step"][t]["by_bucket"]["hard"]["accuracy"]
                          for m in runs]
                cells.append(_cell(values))
            lines.append(f"| {method} | {bucket} | " + " | ".join(cells) + " |")
    lines += ["", "Q-exit at q = 0.9 and at matched compute, both ways: the method's Pareto frontier within "
              "continued LM's average steps, and continued LM's frontier within the method's:", "",
              "| method | avg steps | accuracy | vs LM | at LM's compute | vs LM | LM at this compute | method vs it |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def matched(model: dict, budget: float) -> float:
        return max((p["accuracy"] for p in model["pareto_frontier"] if p["avg_steps"] <= budget + 1e-9),
                   default=float("nan"))

    for method, runs in models.items():
        accuracy = [m["q_exit"]["accuracy"] for m in runs]
        steps_used = [m["q_exit"]["avg_steps"] for m in runs]
        at_budget = [matched(m, base["q_exit"]["avg_steps"]) for m, base in zip(runs, lm)]
        lm_budget = [matched(base, base["q_exit"]["avg_steps"]) for base in lm]
        lm_at_ours = [matched(base, m["q_exit"]["avg_steps"]) for m, base in zip(runs, lm)]
        other = " | " if method == "lm" else f"{_cell(lm_at_ours)} | {_vs(accuracy, lm_at_ours)}"
        lines.append(f"| {method} | {_cell(steps_used)} | {_cell(accuracy)} | "
                     f"{'' if method == 'lm' else _vs(accuracy, [m['q_exit']['accuracy'] for m in lm])} | "
                     f"{_cell(at_budget)} | {'' if method == 'lm' else _vs(at_budget, lm_budget)} | "
                     f"{other} |")
    ks = [g["group"] for g in lm[0]["task"]["groups"]]
    lines += ["", "Held-out composition problems (tuples never trained on for k >= 2): accuracy per loop step by k", "",
              f"| method | k | {header} | last step vs LM |", "| --- | --- |" + " --- |" * (steps + 1)]
    for method, runs in models.items():
        for k in ks:
            per_seed = [next(g for g in m["task"]["groups"] if g["group"] == k)["per_step"] for m in runs]
            base = [next(g for g in m["task"]["groups"] if g["group"] == k)["per_step"][-1]["accuracy"] for m in lm]
            cells = [_cell([p[t]["accuracy"] for p in per_seed]) for t in range(steps)]
            last = [p[-1]["accuracy"] for p in per_seed]
            lines.append(f"| {method} | {k} | " + " | ".join(cells) + f" | {'' if method == 'lm' else _vs(last, base)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("runs", "looprpt_vs_lm"))
    p.add_argument("--depth-study", default=os.path.join("runs", "depth_study"),
                   help="the depth study whose task/nN_1200it/loop models are stage 1 (run when missing)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--iters", type=int, default=100, help="continuation iterations of every method")
    p.add_argument("--eval-iters", type=int, default=20, help="batches of the task's valid split")
    p.add_argument("--lr-sweep", type=float, nargs="+", default=list(LR_SWEEP))
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each on cpu_count / jobs threads")
    p.add_argument("--num-layers", type=int, default=2, help="N of the depth study's looped task model")
    p.add_argument("--loop-steps", type=int, default=4)
    cfg = p.parse_args(argv)
    start = time.time()
    task = depth_study.CompositionTask(render="ids", walk_words=127)
    info = depth_study.task_data(cfg.depth_study, task, num_train=20_000, heldout_per_k=100)
    task_flags = depth_study.task_flags(info, task, cfg.iters)
    stage1_runs = depth_study.part_dir(cfg.depth_study, "task", cfg.num_layers, depth_study.TASK_ITERS)
    stage1 = {seed: os.path.join(stage1_runs, "loop", f"seed{seed}", "checkpoint") for seed in cfg.seeds}
    # a depth-study run is finished when its evaluation is written (after its last checkpoint)
    if not all(os.path.exists(os.path.join(os.path.dirname(path), "eval", "evaluation.json")) for path in stage1.values()):
        _log("stage 1 missing: running the depth study's task part first")
        depth_study.main(["--out", cfg.depth_study, "--parts", "task", "--task-num-layers", str(cfg.num_layers),
                          "--loop-steps", str(cfg.loop_steps), "--seeds", *map(str, cfg.seeds)])

    first = cfg.seeds[0]
    threads = depth_study.threads_per_run(cfg.jobs)
    pool = concurrent.futures.ThreadPoolExecutor(cfg.jobs)

    def run_all(calls) -> list:
        return [done.result() for done in [pool.submit(*call) for call in calls]]

    sweep_runs = {(method, lr): os.path.join(cfg.out, "lr_sweep", f"{method}_lr{lr:g}")
                  for method in ("lm", "looprpt") for lr in cfg.lr_sweep}
    run_all([(continue_stage1, cfg, task_flags, stage1[first], out, method, lr, first, threads)
             for (method, lr), out in sweep_runs.items()])
    sweep: Dict[str, Dict[float, float]] = {}
    for (method, lr), out in sweep_runs.items():
        sweep.setdefault(method, {})[lr] = validation_loss(out)
    chosen = {method: min(losses, key=losses.get) for method, losses in sweep.items()}
    chosen["looprpt-gate-only"] = chosen["looprpt"]

    runs = {}
    for method in METHOD_FLAGS:
        for seed in cfg.seeds:
            out = os.path.join(cfg.out, method, f"seed{seed}")
            if seed == first and method in sweep:
                out = sweep_runs[(method, chosen[method])]
            runs[(method, seed)] = out
    run_all([(continue_stage1, cfg, task_flags, stage1[seed], out, method, chosen[method], seed, threads)
             for (method, seed), out in runs.items()])
    reports = run_all([(evaluate, cfg, info, out, stage1[seed], os.path.join(out, "eval", "report"), threads)
                       for (method, seed), out in runs.items()])
    pool.shutdown()
    models: Dict[str, List[dict]] = {}
    for (method, _), report in zip(runs, reports):
        models.setdefault(method, []).append(report)
    times = {}
    for method in METHOD_FLAGS:
        with open(os.path.join(runs[(method, first)], "log.jsonl")) as f:
            durations = sorted(r["iteration_time"] for r in map(json.loads, f) if "iteration_time" in r)
        times[method] = durations[len(durations) // 2]
    # wall time summed over the invocations that made the runs (a rerun continues or re-renders)
    previous = os.path.join(cfg.out, "report.json")
    wall = time.time() - start
    if os.path.exists(previous):
        with open(previous) as f:
            wall += json.load(f).get("wall_s", 0.0)
    text = render(cfg, sweep, chosen, models, times, wall)
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump({"sweep": {m: {f"{lr:g}": v for lr, v in s.items()} for m, s in sweep.items()},
                   "chosen_lr": chosen, "median_iteration_s": times, "wall_s": wall,
                   "models": {m: [{k: v for k, v in r.items() if k != "pareto_frontier"} for r in runs]
                              for m, runs in models.items()}}, f, indent=2)
    print(text)
    _log(f"{time.time() - start:.0f}s; report in {cfg.out}/report.md")


if __name__ == "__main__":
    main()
