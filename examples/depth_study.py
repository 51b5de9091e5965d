"""Depth study: does a looped model profit from its loops? (Ouro's controlled comparison at CPU scale)

    bash examples/depth_study.sh                 # = python examples/depth_study.py: ~30 min on 2 CPU cores
    python examples/depth_study.py --seeds 1 2 3 --iters 600 --out runs/depth_study

Three models under one token budget, each for every seed:
- ``t1``:   N shared layers, T = 1 (the parameters of the looped model, a quarter of its compute);
- ``loop``: the same N layers looped T = 4 times (same parameters);
- ``deep``: N*T unshared layers, T = 1 (the looped model's compute, T times its block parameters).
They train on one blend: the quickstart's text and reasoning corpus and the composition task
(``data/composition.py``: chained lookups in memorised relations, trained on the answers only),
with the recipe's stage-1 flags (``RECIPE``). Each model is then evaluated with tools/evaluate.py:
held-out cross entropy per loop step on the text, and answer accuracy per loop step and per
number of hops k on the task's held-out problems (k >= 2: tuples never trained on).

The table (``results.md``/``results.json``) gives means and standard deviations over seeds and
two comparisons at the largest k: the loop model's last step against its first step (the same
runs: the paired differences' mean against twice their standard deviation) and against ``t1``
(independent runs: the difference of means against twice the root sum of their variances).
Plots: ``accuracy_vs_step.png`` (accuracy at the largest k against loop step: compute in units
of the N-layer block, so ``deep`` sits at step T) and ``accuracy_vs_k.png``. Finished stages are
skipped on a rerun, an interrupted training resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
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

from megatron_looprpt.data.composition import CompositionTask, write_composition_task  # noqa: E402

TRACKER = "latest_checkpointed_iteration.txt"
# The stage-1 recipe every model trains with (docs/stage1_recipe.md has the ablation behind it).
RECIPE = ["--step-loss-weights", "uniform", "--exit-entropy-coef", "0.05"]


@dataclass
class Arm:
    name: str
    description: str
    num_layers: int
    loop_steps: int


def arms(num_layers: int, loop_steps: int) -> List[Arm]:
    return [
        Arm("t1", f"{num_layers} layers, T=1 (same parameters)", num_layers, 1),
        Arm("loop", f"{num_layers} layers looped T={loop_steps}", num_layers, loop_steps),
        Arm("deep", f"{num_layers * loop_steps} unshared layers, T=1 (same compute)", num_layers * loop_steps, 1),
    ]


def _log(message: str) -> None:
    print(f"[depth] {message}", flush=True)


def _run(cmd: List[str], log_path: str) -> None:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    with open(log_path, "a") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited with {code}; log: {log_path}")


def prepare_data(out: str, task: CompositionTask, num_train: int, heldout_per_k: int, vocab_size: int) -> dict:
    """The quickstart corpus, the composition task, one tokenizer trained on all of them and
    their indexed datasets (the task's with answer-only loss masks), under ``out``/data."""
    from megatron_looprpt.data.corpus import write_default_corpus
    from megatron_looprpt.data.datasets import document_prefix, preprocess_jsonl
    from megatron_looprpt.data.tokenizers import train_sentencepiece

    data = os.path.join(out, "data")
    tokenizer = os.path.join(data, "tokenizer.model")
    info = {"tokenizer": tokenizer, "heldout": os.path.join(data, "composition_heldout.jsonl"),
            "text": document_prefix(os.path.join(data, "text"), "text"),
            "reasoning": document_prefix(os.path.join(data, "reasoning"), "text"),
            "task": document_prefix(os.path.join(data, "composition"), "segments")}
    if all(os.path.exists(info[name] + ".idx") for name in ("text", "reasoning", "task")):
        return info
    corpus = write_default_corpus(data)
    written = write_composition_task(data, task, num_train, heldout_per_k)
    train_sentencepiece([corpus["text_path"], corpus["reasoning_path"], written["train_path"]],
                        tokenizer[: -len(".model")], vocab_size=vocab_size)
    for name, path in (("text", corpus["text_path"]), ("reasoning", corpus["reasoning_path"])):
        preprocess_jsonl(path, os.path.join(data, name), "SentencePieceTokenizer", tokenizer, append_eod=True)
    preprocess_jsonl(written["train_path"], os.path.join(data, "composition"), "SentencePieceTokenizer", tokenizer,
                     json_keys=("segments",), segments=True, append_eod=True, workers=2)
    return info


def train_flags(info: dict, arm: Arm, seed: int, iters: int, save_dir: str, weights: List[float]) -> List[str]:
    return [
        "--model-size", "tiny", "--num-layers", str(arm.num_layers), "--loop-steps", str(arm.loop_steps),
        "--data-path", str(weights[0]), info["text"], str(weights[1]), info["reasoning"],
        str(weights[2]), info["task"], "--split", "90,10,0",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", info["tokenizer"],
        "--micro-batch-size", "8", "--global-batch-size", "16", "--seed", str(seed),
        "--train-iters", str(iters), "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", str(min(20, iters // 5)),
        "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--clip-grad", "1.0",
        "--save", save_dir, "--load", save_dir, "--save-interval", str(max(1, iters // 2)),
        "--log-interval", "50", "--no-progress-bar", "--log-json", os.path.join(save_dir, "log.jsonl"), *RECIPE,
    ]


def trained_iteration(save_dir: str) -> Optional[int]:
    try:
        with open(os.path.join(save_dir, TRACKER)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def run_one(cfg, info: dict, arm: Arm, seed: int) -> str:
    """Train (unless finished) and evaluate (unless reported) one model; its report's path."""
    run_dir = os.path.join(cfg.out, arm.name, f"seed{seed}")
    save_dir = os.path.join(run_dir, "checkpoint")
    report = os.path.join(run_dir, "eval", "evaluation.json")
    if os.path.exists(report):
        return report
    if (trained_iteration(save_dir) or 0) < cfg.iters:
        _log(f"train {arm.name} seed {seed} ({arm.description}), {cfg.iters} iterations")
        start = time.time()
        _run([sys.executable, os.path.join(ROOT, "pretrain_looprpt.py"),
              *train_flags(info, arm, seed, cfg.iters, save_dir, cfg.weights)], os.path.join(run_dir, "train.log"))
        _log(f"  {time.time() - start:.0f}s")
    partial = os.path.join(run_dir, "eval.partial")
    if os.path.exists(partial):
        shutil.rmtree(partial)
    _run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--load", save_dir,
          "--data-path", info["text"], "--eval-iters", str(cfg.eval_iters), "--task-data", info["heldout"],
          "--output-dir", partial], os.path.join(run_dir, "eval.log"))
    os.replace(partial, os.path.dirname(report))
    return report


# ---------------------------------------------------------------------------------------------
# the table


def _mean_std(values: List[float]) -> tuple:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _task_accuracy(model: dict, group: str) -> List[float]:
    entry = next(g for g in model["task"]["groups"] if g["group"] == group)
    return [s["accuracy"] for s in entry["per_step"]]


def collect(reports: Dict[str, List[dict]], descriptions: Dict[str, str]) -> dict:
    """Means and standard deviations over seeds, and the two comparisons at the largest k."""
    groups = reports["loop"][0]["models"][0]["task"]["groups"]
    ks = [g["group"] for g in groups]
    largest = ks[-1]
    result = {"arms": {}, "largest_k": largest}
    for name, runs in reports.items():
        models = [r["models"][0] for r in runs]
        text = [[s["nll"] for s in m["per_step"]] for m in models]
        result["arms"][name] = {
            "description": descriptions[name], "seeds": len(models),
            "text_ce": [_mean_std(list(col)) for col in zip(*text)],
            "text_lm_loss": _mean_std([m["lm_loss"] for m in models]),
            "task": {k: [_mean_std(list(col)) for col in zip(*[_task_accuracy(m, k) for m in models])] for k in ks},
        }
    loop = [_task_accuracy(r["models"][0], largest) for r in reports["loop"]]
    t1 = [_task_accuracy(r["models"][0], largest)[-1] for r in reports["t1"]]
    paired = [acc[-1] - acc[0] for acc in loop]
    gain, spread = _mean_std(paired)
    last = _mean_std([acc[-1] for acc in loop])
    t1_stats = _mean_std(t1)
    result["last_vs_first_step"] = {"gain": gain, "std": spread, "beyond_2_std": gain > 2 * spread}
    vs_t1 = last[0] - t1_stats[0]
    pooled = math.sqrt(last[1] ** 2 + t1_stats[1] ** 2)
    result["loop_vs_t1"] = {"gain": vs_t1, "std": pooled, "beyond_2_std": vs_t1 > 2 * pooled}
    return result


def _cell(stats) -> str:
    return f"{stats[0]:.3f} ± {stats[1]:.3f}"


def format_table(result: dict, cfg) -> str:
    arms_ = result["arms"]
    steps = max(len(a["text_ce"]) for a in arms_.values())
    ks = list(arms_["loop"]["task"])
    lines = [f"Depth study: {cfg.iters} iterations of 16 x 128 tokens, seeds {', '.join(map(str, cfg.seeds))} "
             "(mean ± std over seeds)", "",
             "Held-out text: cross entropy per loop step", "",
             "| model | " + " | ".join(f"step {t + 1}" for t in range(steps)) + " | lm loss |",
             "| --- |" + " --- |" * (steps + 1)]
    for name, arm in arms_.items():
        cells = [_cell(c) for c in arm["text_ce"]] + [""] * (steps - len(arm["text_ce"]))
        lines.append(f"| {name}: {arm['description']} | " + " | ".join(cells) + f" | {_cell(arm['text_lm_loss'])} |")
    lines += ["", "Composition task, held-out problems: answer accuracy per loop step, by hops k", "",
              "| model | k | " + " | ".join(f"step {t + 1}" for t in range(steps)) + " |",
              "| --- | --- |" + " --- |" * steps]
    for name, arm in arms_.items():
        for k in ks:
            cells = [_cell(c) for c in arm["task"][k]] + [""] * (steps - len(arm["task"][k]))
            lines.append(f"| {name} | {k} | " + " | ".join(cells) + " |")
    a, b = result["last_vs_first_step"], result["loop_vs_t1"]
    k = result["largest_k"]
    lines += ["", f"At k = {k}: loop's last step minus its first step {a['gain']:+.3f} (std of the paired "
              f"differences {a['std']:.3f}: {'beyond' if a['beyond_2_std'] else 'within'} two standard deviations); "
              f"loop's last step minus t1 {b['gain']:+.3f} (pooled std {b['std']:.3f}: "
              f"{'beyond' if b['beyond_2_std'] else 'within'} two standard deviations)."]
    return "\n".join(lines)


def write_plots(result: dict, out: str) -> Optional[List[str]]:
    from megatron_looprpt.evaluation.report import pyplot

    plt = pyplot()
    if plt is None:
        return None
    arms_ = result["arms"]
    k = result["largest_k"]
    paths = [os.path.join(out, "accuracy_vs_step.png"), os.path.join(out, "accuracy_vs_k.png")]
    fig, ax = plt.subplots(figsize=(6, 4))
    loop_steps = len(arms_["loop"]["task"][k])
    for name, arm in arms_.items():
        stats = arm["task"][k]
        # x: compute in N-layer blocks; the deep model does T blocks in its one step
        xs = [loop_steps] if name == "deep" else list(range(1, len(stats) + 1))
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                    label=f"{name}: {arm['description']}")
    ax.set_xlabel("loop step (compute in N-layer blocks)")
    ax.set_ylabel(f"held-out accuracy, k = {k}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = list(arms_["loop"]["task"])
    for name, arm in arms_.items():
        ax.errorbar([int(x) for x in ks], [arm["task"][x][-1][0] for x in ks], yerr=[arm["task"][x][-1][1] for x in ks],
                    marker="o", capsize=3, label=f"{name} (last step)")
    ax.set_xlabel("hops k")
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("runs", "depth_study"))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--iters", type=int, default=600, help="training iterations of every model (the token budget)")
    p.add_argument("--num-layers", type=int, default=2, help="N, the looped block's layers")
    p.add_argument("--loop-steps", type=int, default=4, help="T of the looped model")
    p.add_argument("--weights", type=float, nargs=3, default=[0.35, 0.15, 0.5], metavar=("TEXT", "REASONING", "TASK"),
                   help="the training blend")
    p.add_argument("--eval-iters", type=int, default=20, help="text batches of 16 x 128 held-out tokens")
    p.add_argument("--max-hops", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--collect-only", action="store_true", help="rebuild the table and plots from the reports")
    cfg = p.parse_args(argv)
    task = CompositionTask(max_hops=cfg.max_hops)
    start = time.time()
    info = prepare_data(cfg.out, task, num_train=20_000, heldout_per_k=100, vocab_size=cfg.vocab_size)
    study = arms(cfg.num_layers, cfg.loop_steps)
    paths = {arm.name: [os.path.join(cfg.out, arm.name, f"seed{s}", "eval", "evaluation.json") for s in cfg.seeds]
             for arm in study}
    if not cfg.collect_only:
        # seed by seed, so an interrupted study already holds whole comparisons
        for seed in cfg.seeds:
            for arm in study:
                run_one(cfg, info, arm, seed)
    reports = {}
    for name, files in paths.items():
        reports[name] = []
        for path in files:
            with open(path) as f:
                reports[name].append(json.load(f))
    result = collect(reports, {arm.name: arm.description for arm in study})
    result["config"] = {"iters": cfg.iters, "seeds": cfg.seeds, "weights": cfg.weights, "recipe": RECIPE,
                        "task": vars(task) if hasattr(task, "__dict__") else str(task)}
    text = format_table(result, cfg)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(text)
    plots = write_plots(result, cfg.out)
    _log(f"{time.time() - start:.0f}s; results in {cfg.out}/results.md" +
         ("" if plots is None else "; plots " + ", ".join(plots)))


if __name__ == "__main__":
    main()
