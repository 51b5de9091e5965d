"""Depth study: does a looped model profit from its loops? (Ouro's controlled comparison at CPU scale)

    bash examples/depth_study.sh                 # = python examples/depth_study.py (docs/depth.md: wall time)
    python examples/depth_study.py --parts task --seeds 1 2 3 --task-iters 400 --task-num-layers 2

Three models, each for every seed, under one token budget per part:
- ``t1``:   N shared layers, T = 1 (the looped model's parameters, a quarter of its compute);
- ``loop``: the same N layers looped T = 4 times;
- ``deep``: N*T unshared layers, T = 1 (the looped model's compute, T times its block parameters).

Every model is the ``tiny`` preset's width and loop (its stage-1 recipe: input injection, the
last step's loss weighted 0.85 and each other step's 0.05), with N layers. Two parts, each
training the three models from scratch:
- ``task``: the composition task (``data/composition.py``: walks through memorised relations,
  trained on the written entities only; ids for the null tokenizer, so the vocabulary is tiny),
  ``--task-iters`` iterations of 16 x 128 tokens at lr 1e-3 -> 1e-4, N = ``--task-num-layers``
  (1: one layer cannot chain the lookups of a multi-hop answer, so the loop is what must do it;
  with 2, T = 1 learns 4 hops by itself at this budget, docs/depth.md); scored with
  tools/evaluate.py --task-data on held-out walks: answer accuracy per loop step and per hops k
  (for k >= 2 tuples never trained on);
- ``text``: the quickstart's stage 1 on the quickstart corpus (300 iterations, lr 3e-3 -> 3e-4)
  with the default stage-1 recipe (docs/depth.md), N = ``--text-num-layers`` (2: the quickstart's
  tiny preset); held-out cross entropy per loop step.

Runs live under ``--out``/PART/nN_Iit/MODEL/seedS (N layers, I iterations; ``_ouroloop`` and
``_wWEIGHTS`` appended for ``--ouro-loop`` and ``--step-loss-weights``), so studies of different
shapes, budgets and recipes share one directory; a run trained with another recipe than the
study's stops it in one line.

The table (``results.md``, ``results.json``) gives means and standard deviations over seeds,
and at the largest k two comparisons: the loop model's last step against its first (the same
runs: the paired differences' mean against twice their standard deviation) and against ``t1``
(independent runs: the difference of means against twice the root sum of their variances).
Plots: ``accuracy_vs_step.png`` (accuracy at the largest k against loop step, i.e. compute in
N-layer blocks, so ``deep`` sits at step T) and ``accuracy_vs_k.png``. Finished stages are
skipped on a rerun; an interrupted training resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_looprpt.arguments import checkpoint_settings, parse_args  # noqa: E402
from megatron_looprpt.flags import build_parser  # noqa: E402
from megatron_looprpt.data.composition import CompositionTask, write_composition_task  # noqa: E402
from megatron_looprpt.training.checkpointing.meta import read_checkpoint_args  # noqa: E402

TRACKER = "latest_checkpointed_iteration.txt"
# The settings that make a stage-1 recipe: a run trained with other values is another study's
RECIPE_SETTINGS = ("step_loss_weights", "step_increase_penalty", "exit_entropy_coef", "exit_gate_init",
                   "loop_input_injection", "loop_carry", "loop_step_embedding")
TASK_ITERS = 1200
PARTS = ("task", "text")


@dataclass
class Arm:
    name: str
    description: str
    num_layers: int
    loop_steps: int


def arms(num_layers: int, loop_steps: int) -> List[Arm]:
    layers = f"{num_layers} layer" + ("s" if num_layers != 1 else "")
    return [
        Arm("t1", f"{layers}, T=1 (same parameters)", num_layers, 1),
        Arm("loop", f"{layers} looped T={loop_steps}", num_layers, loop_steps),
        Arm("deep", f"{num_layers * loop_steps} unshared layers, T=1 (same compute)", num_layers * loop_steps, 1),
    ]


def _log(message: str) -> None:
    print(f"[depth] {message}", flush=True)


def _run(cmd: List[str], log_path: str, threads: Optional[int] = None) -> None:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    if threads is not None:
        # concurrent runs each get their share of the cores: oversubscribed BLAS threads made
        # two runs together about five times slower than one after the other
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "a") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited with {code}; log: {log_path}")


# ---------------------------------------------------------------------------------------------
# the two parts: their data and training flags


def task_data(out: str, task: CompositionTask, num_train: int, heldout_per_k: int) -> dict:
    """The composition task's walks as an indexed dataset with answer-only loss masks, and its
    held-out walks, under ``out``/data."""
    from megatron_looprpt.data.datasets import document_prefix, preprocess_jsonl

    data = os.path.join(out, "data")
    prefix = document_prefix(os.path.join(data, "composition"), "segments")
    info = {"prefix": prefix, "heldout": os.path.join(data, "composition_heldout.jsonl")}
    if not os.path.exists(prefix + ".idx"):
        written = write_composition_task(data, task, num_train, heldout_per_k)
        preprocess_jsonl(written["train_path"], os.path.join(data, "composition"), "NullTokenizer",
                         vocab_size=task.vocab_size, json_keys=("segments",), segments=True, append_eod=True)
    return info


def task_flags(info: dict, task: CompositionTask, iters: int) -> List[str]:
    return [
        "--data-path", info["prefix"], "--split", "95,5,0", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", str(task.vocab_size), "--lr", "1e-3", "--min-lr", "1e-4",
        "--lr-warmup-iters", str(min(20, iters // 5)), "--train-iters", str(iters),
    ]


def text_flags(iters: int) -> List[str]:
    from megatron_looprpt import quickstart

    tokenizer, prefixes = quickstart._prepare_data(os.path.join("runs", "quickstart"))
    return [*quickstart._common_flags(tokenizer, prefixes), "--lr", "3e-3", "--min-lr", "3e-4",
            "--lr-warmup-iters", str(min(20, iters // 5)), "--train-iters", str(iters)]


def train_flags(part_flags: List[str], arm: Arm, seed: int, iters: int, save_dir: str) -> List[str]:
    # later flags win (argparse): the arm's shape and seed over the part's common flags
    return [
        "--model-size", "tiny", "--micro-batch-size", "8", "--global-batch-size", "16",
        "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--clip-grad", "1.0", *part_flags,
        "--num-layers", str(arm.num_layers), "--loop-steps", str(arm.loop_steps), "--seed", str(seed),
        # at most 250 iterations lost when a long run is interrupted (they resume from here)
        "--save", save_dir, "--load", save_dir, "--save-interval", str(max(1, min(iters // 2, 250))),
        "--eval-interval", "0", "--log-interval", "50", "--no-progress-bar",
        "--log-json", os.path.join(save_dir, "log.jsonl"),
    ]


def trained_iteration(save_dir: str) -> Optional[int]:
    try:
        with open(os.path.join(save_dir, TRACKER)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def part_dir(out: str, part: str, num_layers: int, iters: int, ouro_loop: bool = False,
             step_loss_weights: Optional[str] = None) -> str:
    """Where a part's runs with an N-layer block and a budget of ``iters`` live (the models under
    MODEL/seedS): a rerun with another N, budget, loop or stage-1 weighting (None: the default)
    starts its own runs instead of resuming these."""
    weights = "" if step_loss_weights is None else "_w" + step_loss_weights.replace(":", "").replace(",", "-")
    return os.path.join(out, part, f"n{num_layers}_{iters}it" + ("_ouroloop" if ouro_loop else "") + weights)


def refuse_another_recipe(save_dir: str, flags: List[str]) -> None:
    """Stop, in one line, when ``save_dir`` holds a model trained with another stage-1 recipe than
    ``flags`` give now (runs of an older checkout, say): the study would report it as this one."""
    saved = read_checkpoint_args(save_dir)
    if saved is None:
        return
    saved, wanted = checkpoint_settings(saved), vars(parse_args(flags))
    differ = [f"--{name.replace('_', '-')} {saved[name]} (now {wanted[name]})"
              for name in RECIPE_SETTINGS if name in saved and saved[name] != wanted[name]]
    if differ:
        raise SystemExit(f"[depth] {save_dir} was trained with {', '.join(differ)}: move its runs away "
                         "or pass another --out")


def run_one(runs: str, part: str, part_flags: List[str], eval_flags: List[str], arm: Arm, seed: int,
            iters: int, threads: Optional[int] = None) -> str:
    """Train (unless finished) and evaluate (unless reported) one model under ``runs`` (a
    ``part_dir``); its report's path."""
    run_dir = os.path.join(runs, arm.name, f"seed{seed}")
    save_dir = os.path.join(run_dir, "checkpoint")
    report = os.path.join(run_dir, "eval", "evaluation.json")
    flags = train_flags(part_flags, arm, seed, iters, save_dir)
    refuse_another_recipe(save_dir, flags)
    if os.path.exists(report):
        return report
    if (trained_iteration(save_dir) or 0) < iters:
        _log(f"{part}: train {arm.name} seed {seed} ({arm.description}), {iters} iterations")
        start = time.time()
        _run([sys.executable, os.path.join(ROOT, "pretrain_looprpt.py"),
              *flags], os.path.join(run_dir, "train.log"), threads)
        _log(f"{part}: {arm.name} seed {seed} trained in {time.time() - start:.0f}s")
    partial = os.path.join(run_dir, "eval.partial")
    if os.path.exists(partial):
        shutil.rmtree(partial)
    _run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--load", save_dir, *eval_flags,
          "--output-dir", partial], os.path.join(run_dir, "eval.log"), threads)
    os.replace(partial, os.path.dirname(report))
    return report


# ---------------------------------------------------------------------------------------------
# the table


def mean_std(values: List[float]) -> tuple:
    """Mean and sample standard deviation (0 for one value) over seeds."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def threads_per_run(jobs: int) -> Optional[int]:
    """Threads each of ``jobs`` concurrent runs gets (None: one run alone keeps the default)."""
    return None if jobs == 1 else max(1, (os.cpu_count() or 1) // jobs)


def _task_accuracy(model: dict, group: str) -> List[float]:
    entry = next(g for g in model["task"]["groups"] if g["group"] == group)
    return [s["accuracy"] for s in entry["per_step"]]


def majority_baseline(heldout_path: str) -> Dict[str, float]:
    """Accuracy of always answering the commonest held-out answer, per k: chance is not 1/E,
    since the held-out tuples need not lead everywhere equally often."""
    answers: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with open(heldout_path) as f:
        for line in f:
            record = json.loads(line)
            for answer, k in zip(record["segments"][1::2], record["k"]):
                answers[str(k)][answer.strip()] += 1
    return {k: counts.most_common(1)[0][1] / sum(counts.values()) for k, counts in answers.items()}


def collect_task(reports: Dict[str, List[dict]], descriptions: Dict[str, str], baseline: Dict[str, float]) -> dict:
    """Means and standard deviations over seeds, and the two comparisons at the largest k."""
    ks = [g["group"] for g in reports["loop"][0]["models"][0]["task"]["groups"]]
    largest = ks[-1]
    result = {"arms": {}, "largest_k": largest, "majority_baseline": baseline}
    for name, runs in reports.items():
        models = [r["models"][0] for r in runs]
        result["arms"][name] = {
            "description": descriptions[name], "seeds": len(models),
            "accuracy": {k: [mean_std(list(col)) for col in zip(*[_task_accuracy(m, k) for m in models])]
                         for k in ks},
        }
    loop = [_task_accuracy(r["models"][0], largest) for r in reports["loop"]]
    t1 = [_task_accuracy(r["models"][0], largest)[-1] for r in reports["t1"]]
    gain, spread = mean_std([acc[-1] - acc[0] for acc in loop])
    result["last_vs_first_step"] = {"gain": gain, "std": spread, "beyond_2_std": gain > 2 * spread}
    last, t1_stats = mean_std([acc[-1] for acc in loop]), mean_std(t1)
    pooled = math.sqrt(last[1] ** 2 + t1_stats[1] ** 2)
    result["loop_vs_t1"] = {"gain": last[0] - t1_stats[0], "std": pooled,
                            "beyond_2_std": last[0] - t1_stats[0] > 2 * pooled}
    return result


def collect_text(reports: Dict[str, List[dict]], descriptions: Dict[str, str]) -> dict:
    result = {"arms": {}}
    for name, runs in reports.items():
        models = [r["models"][0] for r in runs]
        ce = [mean_std(list(col)) for col in zip(*[[s["nll"] for s in m["per_step"]] for m in models])]
        means = [m for m, _ in ce]
        result["arms"][name] = {"description": descriptions[name], "seeds": len(models), "ce": ce,
                                "lm_loss": mean_std([m["lm_loss"] for m in models]),
                                "non_increasing": all(b <= a for a, b in zip(means, means[1:]))}
    return result


def _cell(stats) -> str:
    return f"{stats[0]:.3f} ± {stats[1]:.3f}"


def _row(label: str, cells: List[str], steps: int) -> str:
    return f"| {label} | " + " | ".join(cells + [""] * (steps - len(cells))) + " |"


def format_tables(results: dict, cfg) -> str:
    loop = "Ouro's loop, --no-loop-input-injection" if cfg.ouro_loop else "input injection, the tiny preset's recipe"
    weights = cfg.step_loss_weights or build_parser().get_default("step_loss_weights")
    lines = [f"Depth study, seeds {', '.join(map(str, cfg.seeds))} (mean ± std over seeds; the looped model: {loop}; "
             f"stage-1 loss --step-loss-weights {weights})"]
    steps = cfg.loop_steps
    header = " | ".join(f"step {t + 1}" for t in range(steps))
    if "task" in results:
        task = results["task"]
        lines += ["", f"Composition task ({cfg.task_iters} iterations of 16 x 128 tokens): held-out answer accuracy "
                  "per loop step, by hops k (majority-answer baseline in the last column)", "",
                  f"| model | k | {header} | baseline |", "| --- | --- |" + " --- |" * (steps + 1)]
        for name, arm in task["arms"].items():
            for k, stats in arm["accuracy"].items():
                cells = [_cell(c) for c in stats] + [""] * (steps - len(stats))
                lines.append(f"| {name}: {arm['description']} | {k} | " + " | ".join(cells) +
                             f" | {task['majority_baseline'][k]:.3f} |")
        a, b, k = task["last_vs_first_step"], task["loop_vs_t1"], task["largest_k"]
        lines += ["", f"At k = {k}: loop's last step minus its first {a['gain']:+.3f} (std of the paired "
                  f"differences {a['std']:.3f}: {'beyond' if a['beyond_2_std'] else 'within'} two standard "
                  f"deviations); loop's last step minus t1 {b['gain']:+.3f} (pooled std {b['std']:.3f}: "
                  f"{'beyond' if b['beyond_2_std'] else 'within'} two standard deviations)."]
    if "text" in results:
        lines += ["", f"Text ({cfg.text_iters} iterations of the quickstart's stage 1 with the recipe): held-out "
                  "cross entropy per loop step", "", f"| model | {header} | lm loss | non-increasing |",
                  "| --- |" + " --- |" * (steps + 2)]
        for name, arm in results["text"]["arms"].items():
            cells = [_cell(c) for c in arm["ce"]] + [""] * (steps - len(arm["ce"]))
            lines.append(f"| {name}: {arm['description']} | " + " | ".join(cells) +
                         f" | {_cell(arm['lm_loss'])} | {'yes' if arm['non_increasing'] else 'no'} |")
    return "\n".join(lines)


def write_plots(task: dict, out: str) -> Optional[List[str]]:
    from megatron_looprpt.evaluation.report import pyplot

    plt = pyplot()
    if plt is None:
        return None
    arms_, k = task["arms"], task["largest_k"]
    loop_steps = len(arms_["loop"]["accuracy"][k])
    paths = [os.path.join(out, "accuracy_vs_step.png"), os.path.join(out, "accuracy_vs_k.png")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, arm in arms_.items():
        stats = arm["accuracy"][k]
        # x: compute in N-layer blocks; the deep model runs T blocks in its one step
        xs = [loop_steps] if name == "deep" else list(range(1, len(stats) + 1))
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                    label=f"{name}: {arm['description']}")
    ax.axhline(task["majority_baseline"][k], color="gray", linestyle=":", label="majority answer")
    ax.set_xticks(range(1, loop_steps + 1))
    ax.set_xlabel("loop step (compute in N-layer blocks)")
    ax.set_ylabel(f"held-out accuracy, k = {k}")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = list(arms_["loop"]["accuracy"])
    for name, arm in arms_.items():
        ax.errorbar([int(x) for x in ks], [arm["accuracy"][x][-1][0] for x in ks],
                    yerr=[arm["accuracy"][x][-1][1] for x in ks], marker="o", capsize=3, label=f"{name} (last step)")
    ax.set_xticks([int(x) for x in ks])
    ax.set_xlabel("hops k")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def _reports(runs_dir: str, study: List[Arm], seeds: List[int]) -> Dict[str, List[dict]]:
    reports = {}
    for arm in study:
        reports[arm.name] = []
        for seed in seeds:
            with open(os.path.join(runs_dir, arm.name, f"seed{seed}", "eval", "evaluation.json")) as f:
                reports[arm.name].append(json.load(f))
    return reports


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("runs", "depth_study"))
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--task-iters", type=int, default=TASK_ITERS, help="training iterations of the task part")
    p.add_argument("--text-iters", type=int, default=300, help="training iterations of the text part")
    p.add_argument("--task-num-layers", type=int, default=1, help="N, the looped block's layers, on the task")
    p.add_argument("--text-num-layers", type=int, default=2, help="N, the looped block's layers, on text")
    p.add_argument("--loop-steps", type=int, default=4, help="T of the looped model")
    p.add_argument("--max-hops", type=int, default=4, help="the task's largest k")
    p.add_argument("--text-eval-iters", type=int, default=20, help="held-out text batches of 16 x 128 tokens")
    p.add_argument("--jobs", type=int, default=2,
                   help="runs trained at once, each on cpu_count / jobs threads (2 on 2 cores: about twice "
                        "the throughput of one run using both)")
    p.add_argument("--ouro-loop", action="store_true",
                   help="the looped model without input injection (--no-loop-input-injection: Ouro's loop); "
                        "runs under PART/nN_Iit_ouroloop")
    p.add_argument("--step-loss-weights", default=None,
                   help="the stage-1 weighting over loop steps of every model (pretrain_looprpt.py's flag; default: "
                        "its default, the recipe); runs under PART/nN_Iit_wWEIGHTS")
    p.add_argument("--collect-only", action="store_true", help="rebuild the tables and plots from the reports")
    cfg = p.parse_args(argv)
    start = time.time()
    # one walk per training sequence (seq_length 128 = 127 tokens + eod)
    task = CompositionTask(max_hops=cfg.max_hops, render="ids", walk_words=127)
    results = {"config": {**vars(cfg), "task": vars(task)}}
    for part in cfg.parts:
        if part == "task":
            info = task_data(cfg.out, task, num_train=20_000, heldout_per_k=100)
            flags, iters = task_flags(info, task, cfg.task_iters), cfg.task_iters
            eval_flags = ["--eval-iters", "1", "--task-data", info["heldout"]]
            num_layers = cfg.task_num_layers
        else:
            flags, iters = text_flags(cfg.text_iters), cfg.text_iters
            eval_flags = ["--eval-iters", str(cfg.text_eval_iters)]
            num_layers = cfg.text_num_layers
        if cfg.ouro_loop:
            flags = [*flags, "--no-loop-input-injection"]
        if cfg.step_loss_weights is not None:
            flags = [*flags, "--step-loss-weights", cfg.step_loss_weights]
        study = arms(num_layers, cfg.loop_steps)
        runs_dir = part_dir(cfg.out, part, num_layers, iters, cfg.ouro_loop, cfg.step_loss_weights)
        descriptions = {arm.name: arm.description for arm in study}
        if not cfg.collect_only:
            # seed by seed, so an interrupted study already holds whole comparisons; the slowest
            # arms first within a seed, so that the workers finish together
            runs = [(arm, seed) for seed in cfg.seeds for arm in sorted(study, key=lambda a: -a.num_layers * a.loop_steps)]
            threads = threads_per_run(cfg.jobs)
            with concurrent.futures.ThreadPoolExecutor(cfg.jobs) as pool:
                for done in [pool.submit(run_one, runs_dir, part, flags, eval_flags, arm, seed, iters, threads)
                             for arm, seed in runs]:
                    done.result()
        reports = _reports(runs_dir, study, cfg.seeds)
        results[part] = (collect_task(reports, descriptions, majority_baseline(info["heldout"])) if part == "task"
                         else collect_text(reports, descriptions))
    text = format_tables(results, cfg)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(text)
    plots = write_plots(results["task"], cfg.out) if "task" in results else None
    _log(f"{time.time() - start:.0f}s; results in {cfg.out}/results.md" +
         ("" if not plots else "; plots " + ", ".join(plots)))


if __name__ == "__main__":
    main()
