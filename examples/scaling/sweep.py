"""Scaling sweep: LoopRPT vs continued LM pre-training over several model sizes, one command.

    python examples/scaling/sweep.py                      # 4 CPU sizes (tiny, small, medium, base)
    python examples/scaling/sweep.py --sizes tiny --stage1-iters 4 --continue-iters 2   # smoke run
    python examples/scaling/sweep.py --sweep ouro --data-path ... --tokenizer-type HuggingFaceTokenizer \\
        --tokenizer-model tokenizer.json --launcher "torchrun --nproc-per-node 8"        # a GPU node

For each size: stage-1 LM pre-training -> checkpoint; then, from that same checkpoint, each
method (continued LM pre-training and LoopRPT, examples/looprpt_vs_lm.py's recipe) for the same
number of iterations; then tools/evaluate.py on each (and on the stage-1 model), difficulty
buckets by the stage-1 model's entropy (by default hard = its top 20%, LoopRPT's hard-token
ratio: --difficulty-quantiles 0.5 0.8). Finally the reports are collected into one table
(console, results.md, results.json) and plots (per-step accuracy by size, accuracy vs compute
per size, hard-token gain of LoopRPT over LM vs size).

Resuming: a training stage is finished when its checkpoint tracker reaches its iteration count,
an evaluation when its evaluation.json exists (written to a side directory and renamed into
place); finished stages are skipped. An interrupted training stage restarts from its latest
checkpoint (every --save-interval iterations, default half the stage); a stage whose upstream
stage was not finished is stale and is redone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for _path in (ROOT, os.path.dirname(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from megatron_looprpt.import_notes import silence_import_notes  # noqa: E402
from megatron_looprpt.deferred_compile import defer_megatron_compiles  # noqa: E402

silence_import_notes()
defer_megatron_compiles()

import looprpt_vs_lm as experiment  # noqa: E402  (examples/looprpt_vs_lm.py: the two methods)

STAGE1 = "stage1"
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
PER_STEP_PLOT = "per_step_accuracy_by_size.png"
COMPUTE_PLOT = "accuracy_vs_compute.png"
GAIN_PLOT = "hard_token_gain.png"
METHOD_NAMES = {STAGE1: "stage 1", "lm": "continued LM", "looprpt": "LoopRPT"}


class SweepError(RuntimeError):
    pass


@dataclass(frozen=True)
class Size:
    """One point of the sweep: a --model-size preset plus shape flags that override it."""

    name: str
    preset: str
    flags: Tuple[str, ...] = ()


SWEEPS: Dict[str, List[Size]] = {
    # CPU-sized presets (megatron_looprpt/presets.py), 1.4M to 9.6M parameters with a 4096 vocabulary.
    "cpu": [Size("tiny", "tiny"), Size("small", "small"), Size("medium", "medium"), Size("base", "base")],
    # Ouro's width (hidden 2048, 16 heads, SwiGLU 5632, T=4), 8 to 48 shared layers: ~0.6B to 2.6B.
    # Every depth divides by the default pipeline size of 4.
    "ouro": [Size("ouro-L8", "ouro-1.4b", ("--num-layers", "8")),
             Size("ouro-L16", "ouro-1.4b", ("--num-layers", "16")),
             Size("ouro-1.4b", "ouro-1.4b"), Size("ouro-2.6b", "ouro-2.6b")],
}


@dataclass
class SweepConfig:
    sizes: List[Size]
    methods: Tuple[str, ...] = ("lm", "looprpt")
    out: str = os.path.join("runs", "scaling")
    stage1_iters: int = 120
    continue_iters: int = 30
    save_interval: Optional[int] = None          # None: half of each training stage
    eval_iters: int = 20
    micro_batch_size: int = 8
    global_batch_size: int = 8
    data_path: Optional[List[str]] = None        # None: the quickstart's corpus, built under out/data
    tokenizer_type: str = "SentencePieceTokenizer"
    tokenizer_model: Optional[str] = None
    split: str = "90,10,0"
    launcher: List[str] = field(default_factory=lambda: [sys.executable])
    train_flags: List[str] = field(default_factory=list)    # appended to every training stage
    stage1_flags: List[str] = field(default_factory=list)   # appended to stage 1 only (after train_flags)
    eval_flags: List[str] = field(default_factory=list)     # appended to every tools/evaluate.py run
    # Bucket thresholds at these quantiles of the stage-1 model's entropy: the 20% of tokens it is
    # least sure of are hard (LoopRPT's default --rl-hard-token-ratio), whatever its training. Fixed
    # thresholds in nats (difficulty_thresholds) replace them.
    difficulty_quantiles: Optional[Tuple[float, float]] = (0.5, 0.8)
    difficulty_thresholds: Optional[Tuple[float, float]] = None
    matched_steps: Optional[float] = None        # None: per size, the fewest Q-exit steps of the methods


def _gpus() -> int:
    if os.environ.get("GPUS_PER_NODE"):
        return int(os.environ["GPUS_PER_NODE"])
    import torch

    return max(torch.cuda.device_count(), 1)


def profile(name: str) -> SweepConfig:
    if name == "cpu":
        return SweepConfig(sizes=list(SWEEPS["cpu"]))
    # One node of 8 GPUs by default: TP=2 x PP=4 x DP=1 (DP grows with --launcher's world size).
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "4"]
    return SweepConfig(
        sizes=list(SWEEPS["ouro"]), out=os.path.join("runs", "scaling_ouro"),
        stage1_iters=20000, continue_iters=2000, save_interval=1000, eval_iters=50,
        micro_batch_size=2, global_batch_size=256, split="990,9,1",
        tokenizer_type="HuggingFaceTokenizer",
        launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(_gpus())],
        train_flags=["--bf16", *layout, "--sequence-parallel", "--use-distributed-optimizer",
                     "--log-interval", "10"],
        stage1_flags=["--lr", "3e-4", "--min-lr", "3e-5", "--lr-warmup-iters", "1000"],
        eval_flags=layout,
    )


# ---------------------------------------------------------------------------------------------
# stages


def _log(message: str) -> None:
    print(f"[sweep] {message}", flush=True)


def trained_iteration(save_dir: str) -> Optional[int]:
    """The iteration of the latest checkpoint in ``save_dir`` (its tracker), or None."""
    try:
        with open(os.path.join(save_dir, experiment.TRACKER)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def finished(save_dir: str, iters: int) -> bool:
    done = trained_iteration(save_dir)
    return done is not None and done >= iters


def report_path(size_dir: str, method: str) -> str:
    return os.path.join(size_dir, "eval", method, "evaluation.json")


def _run(cmd: List[str], log_path: str) -> None:
    """Run a stage, its output both on the console and appended to ``log_path``."""
    _log("$ " + shlex.join(cmd))
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    if code != 0:
        raise SweepError(f"{shlex.join(cmd[:3])} ... exited with {code}; log: {log_path}")


def _data_flags(cfg: SweepConfig) -> List[str]:
    from megatron_looprpt import quickstart

    if cfg.data_path is None:   # the quickstart's corpus and schedule flags (--model-size etc. overridden)
        tokenizer, prefixes = quickstart._prepare_data(cfg.out)
        return quickstart._common_flags(tokenizer, prefixes)
    return ["--data-path", *cfg.data_path, "--split", cfg.split, "--tokenizer-type", cfg.tokenizer_type,
            *(["--tokenizer-model", cfg.tokenizer_model] if cfg.tokenizer_model else []),
            "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", "1234"]


def _interval(cfg: SweepConfig, iters: int) -> int:
    return cfg.save_interval or max(1, iters // 2)


def _discard(path: str, why: str) -> None:
    if os.path.exists(path):
        _log(f"removing {path} ({why})")
        shutil.rmtree(path)


def train_stage(cfg: SweepConfig, size_dir: str, stage: str, iters: int, flags: List[str]) -> bool:
    """Run a training stage unless it is finished; True when it ran."""
    save_dir = os.path.join(size_dir, stage)
    if finished(save_dir, iters):
        _log(f"skip {save_dir}: finished ({iters} iterations)")
        return False
    done = trained_iteration(save_dir)
    _log(f"train {save_dir}: " + (f"resuming at iteration {done} of {iters}" if done else f"{iters} iterations"))
    _run([*cfg.launcher, os.path.join(ROOT, "pretrain_looprpt.py"), *flags],
         os.path.join(size_dir, "logs", f"{stage}.log"))
    if not finished(save_dir, iters):
        raise SweepError(f"{save_dir}: training ended before iteration {iters}")
    return True


def difficulty_flags(cfg: SweepConfig) -> List[str]:
    if cfg.difficulty_thresholds is not None:
        return ["--difficulty-thresholds", *map(str, cfg.difficulty_thresholds)]
    return ["--difficulty-quantiles", *map(str, cfg.difficulty_quantiles)]


def evaluate_stage(cfg: SweepConfig, size_dir: str, method: str) -> bool:
    """Evaluate one model unless its report exists; True when it ran. The report and plots are
    written to a side directory that is renamed into place when complete."""
    final = os.path.dirname(report_path(size_dir, method))
    if os.path.exists(report_path(size_dir, method)):
        _log(f"skip {final}: report exists")
        return False
    stage1 = os.path.join(size_dir, STAGE1)
    partial = final + ".partial"
    _discard(partial, "an unfinished evaluation")
    _log(f"evaluate {os.path.join(size_dir, method)}")
    _run(experiment.evaluate_command(os.path.join(size_dir, method), partial, cfg.eval_iters,
                                     reference=None if method == STAGE1 else stage1,
                                     launcher=cfg.launcher, extra=[*difficulty_flags(cfg), *cfg.eval_flags]),
         os.path.join(size_dir, "logs", f"eval_{method}.log"))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(partial, final)
    return True


def count_parameters(save_dir: str) -> Optional[int]:
    """Model parameters of the latest checkpoint in ``save_dir``, from the global shapes in its
    torch_dist metadata (independent of the TP/PP layout that wrote it); None if unreadable."""
    try:
        from torch.distributed.checkpoint import FileSystemReader

        from megatron_looprpt.training import checkpointing

        path, _ = checkpointing.resolve_checkpoint(save_dir)
        metadata = FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as error:  # noqa: BLE001 - a count is a nicety, not a reason to stop
        _log(f"parameter count of {save_dir} unavailable ({type(error).__name__}: {error})")
        return None
    return sum(math.prod(m.size) for key, m in metadata.items()
               if hasattr(m, "size") and "_extra_state" not in key
               and not key.startswith(("optimizer.", "rng_state", "teacher")))


def run_size(cfg: SweepConfig, size: Size, common: List[str]) -> None:
    size_dir = os.path.join(cfg.out, size.name)
    stage1 = os.path.join(size_dir, STAGE1)
    shape = ["--model-size", size.preset, *size.flags, "--micro-batch-size", str(cfg.micro_batch_size),
             "--global-batch-size", str(cfg.global_batch_size), "--no-progress-bar"]
    from megatron_looprpt import quickstart

    # A stage is kept only if everything upstream of it was finished before this run.
    if not finished(stage1, cfg.stage1_iters):
        for method in (*cfg.methods, "eval"):
            _discard(os.path.join(size_dir, method), "stage 1 is not finished, so it is stale")
    for method in cfg.methods:
        if not finished(os.path.join(size_dir, method), cfg.continue_iters):
            _discard(os.path.dirname(report_path(size_dir, method)), f"{method} training is not finished")
    if not finished(stage1, cfg.stage1_iters):
        _discard(os.path.dirname(report_path(size_dir, STAGE1)), "stage 1 is not finished")

    interval = _interval(cfg, cfg.stage1_iters)
    train_stage(cfg, size_dir, STAGE1, cfg.stage1_iters, [
        *common, *shape, *quickstart.stage1_flags(stage1, cfg.stage1_iters,
                                                  warmup=max(1, min(20, cfg.stage1_iters // 10)),
                                                  interval=interval),
        *cfg.train_flags, *cfg.stage1_flags])
    info_path = os.path.join(size_dir, "size.json")
    if not os.path.exists(info_path):
        info = {**dataclasses.asdict(size), "params": count_parameters(stage1)}
        with open(info_path, "w") as f:
            json.dump(info, f, indent=2)
    for method in cfg.methods:
        out = os.path.join(size_dir, method)
        train_stage(cfg, size_dir, method, cfg.continue_iters, [
            *common, *shape, *experiment.continuation_flags(stage1, out, cfg.continue_iters, method,
                                                            save_interval=_interval(cfg, cfg.continue_iters)),
            *cfg.train_flags])
    for method in (STAGE1, *cfg.methods):
        evaluate_stage(cfg, size_dir, method)


def run_sweep(cfg: SweepConfig) -> dict:
    start = time.time()
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "sweep.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    common = _data_flags(cfg)
    for size in cfg.sizes:
        _log(f"== size {size.name}: --model-size {size.preset} {' '.join(size.flags)}".rstrip())
        run_size(cfg, size, common)
    results = collect(cfg.out, [s.name for s in cfg.sizes], cfg.methods, cfg.matched_steps)
    _log(f"done in {time.time() - start:.0f}s")
    return results


# ---------------------------------------------------------------------------------------------
# collection: one table, plots


def _frontier_accuracy(model: dict, budget: float) -> Optional[float]:
    """The best accuracy a model reaches with at most ``budget`` average loop steps per token,
    over its Pareto frontier (Q-exit thresholds and fixed depths)."""
    within = [p["accuracy"] for p in model["pareto_frontier"] if p["avg_steps"] <= budget + 1e-9]
    return max(within) if within else None


def _row(size: str, info: dict, method: str, model: dict) -> dict:
    steps = model["per_step"]
    return {
        "size": size, "params": info.get("params"), "method": method,
        "num_layers": model["num_layers"], "hidden_size": model["hidden_size"],
        "loop_steps": model["loop_steps"], "iteration": model["iteration"], "num_tokens": model["num_tokens"],
        "hard_fraction": model["buckets"]["hard"]["fraction"],
        "per_step_accuracy": [s["accuracy"] for s in steps],
        "per_step_hard_accuracy": [s["by_bucket"]["hard"]["accuracy"] for s in steps],
        "accuracy": steps[-1]["accuracy"],
        "hard_accuracy": steps[-1]["by_bucket"]["hard"]["accuracy"],
        "exit_q": model["q_exit"]["q"],
        "exit_avg_steps": model["q_exit"]["avg_steps"],
        "exit_accuracy": model["q_exit"]["accuracy"],
        "exit_hard_accuracy": model["buckets"]["hard"]["exit_accuracy"],
        "expected_exit_step": model["q_exit"]["expected_exit_step"],
    }


def _diff(a, b):
    return None if a is None or b is None else a - b


def load_reports(out: str, sizes: List[str], methods) -> Dict[str, Dict[str, dict]]:
    """{size: {method: the evaluated model's report entry}} for the reports that exist."""
    reports: Dict[str, Dict[str, dict]] = {}
    for size in sizes:
        for method in (STAGE1, *methods):
            path = report_path(os.path.join(out, size), method)
            if os.path.exists(path):
                with open(path) as f:
                    reports.setdefault(size, {})[method] = json.load(f)["models"][0]
    return reports


def collect(out: str, sizes: List[str], methods=("lm", "looprpt"), matched_steps: Optional[float] = None) -> dict:
    """Collect the sweep's reports under ``out`` into results.json, results.md and the plots;
    prints the table. Sizes or methods without a report are left out (a partial sweep)."""
    reports = load_reports(out, sizes, methods)
    rows, gains = [], []
    for size, models in reports.items():
        info_path = os.path.join(out, size, "size.json")
        info = {}
        if os.path.exists(info_path):
            with open(info_path) as f:
                info = json.load(f)
        exits = [models[m]["q_exit"]["avg_steps"] for m in methods if m in models]
        budget = matched_steps if matched_steps is not None else (min(exits) if exits else None)
        by_method = {}
        for method, model in models.items():
            row = _row(size, info, method, model)
            row["matched_steps"] = budget
            row["matched_accuracy"] = None if budget is None else _frontier_accuracy(model, budget)
            rows.append(row)
            by_method[method] = row
        if "lm" in by_method and "looprpt" in by_method:
            lm, rl = by_method["lm"], by_method["looprpt"]
            gains.append({"size": size, "params": info.get("params"),
                          "hard_accuracy": _diff(rl["hard_accuracy"], lm["hard_accuracy"]),
                          "exit_hard_accuracy": _diff(rl["exit_hard_accuracy"], lm["exit_hard_accuracy"]),
                          "accuracy": _diff(rl["accuracy"], lm["accuracy"]),
                          "matched_accuracy": _diff(rl["matched_accuracy"], lm["matched_accuracy"])})
    results = {"sizes": sizes, "methods": [STAGE1, *methods], "rows": rows, "gains": gains}
    with open(os.path.join(out, RESULTS_JSON), "w") as f:
        json.dump(results, f, indent=2)
    table = format_table(results)
    with open(os.path.join(out, RESULTS_MD), "w") as f:
        f.write(table)
    print(table)
    plots = write_plots(results, reports, out)
    _log("results: " + ", ".join([os.path.join(out, RESULTS_MD), os.path.join(out, RESULTS_JSON), *(plots or [])]))
    if plots is None:
        _log("plots skipped (matplotlib is not installed: pip install matplotlib)")
    results["plots"] = plots
    return results


def _f(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _params(n) -> str:
    return "-" if n is None else (f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M")


def format_table(results: dict) -> str:
    lines = ["| size | params | method | accuracy per loop step | hard acc (last step) | "
             "avg exit step (Q-exit q) | acc at Q-exit | hard acc at Q-exit | acc at matched compute (steps) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["rows"]:
        lines.append(
            f"| {r['size']} | {_params(r['params'])} | {METHOD_NAMES.get(r['method'], r['method'])} | "
            + " / ".join(_f(a) for a in r["per_step_accuracy"])
            + f" | {_f(r['hard_accuracy'])} | {_f(r['exit_avg_steps'], '.2f')} (q={r['exit_q']:g}) | "
            f"{_f(r['exit_accuracy'])} | {_f(r['exit_hard_accuracy'])} | "
            f"{_f(r['matched_accuracy'])} ({_f(r['matched_steps'], '.2f')}) |")
    if results["gains"]:
        lines += ["", "LoopRPT minus continued LM:", "",
                  "| size | params | hard acc (last step) | hard acc at Q-exit | acc (last step) | acc at matched compute |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for g in results["gains"]:
            lines.append(f"| {g['size']} | {_params(g['params'])} | {_f(g['hard_accuracy'], '+.4f')} | "
                         f"{_f(g['exit_hard_accuracy'], '+.4f')} | {_f(g['accuracy'], '+.4f')} | "
                         f"{_f(g['matched_accuracy'], '+.4f')} |")
    return "\n".join(lines) + "\n"


_METHOD_LINES = {STAGE1: (":", "^"), "lm": ("-", "o"), "looprpt": ("--", "s")}
_METHOD_COLORS = {STAGE1: "tab:gray", "lm": "tab:blue", "looprpt": "tab:purple"}


def write_plots(results: dict, reports: Dict[str, Dict[str, dict]], out: str) -> Optional[List[str]]:
    from megatron_looprpt.evaluation import report

    plt = report.pyplot()
    if plt is None:
        return None
    sizes = [s for s in results["sizes"] if s in reports]
    if not sizes:
        return []
    colors = plt.get_cmap("viridis")
    color = {s: colors(i / max(len(sizes) - 1, 1)) for i, s in enumerate(sizes)}
    paths = [os.path.join(out, name) for name in (PER_STEP_PLOT, COMPUTE_PLOT, GAIN_PLOT)]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, key, title in zip(axes, ("per_step_accuracy", "per_step_hard_accuracy"), ("all tokens", "hard tokens")):
        for r in results["rows"]:
            values = [float("nan") if v is None else v for v in r[key]]
            line, marker = _METHOD_LINES.get(r["method"], ("-.", "x"))
            ax.plot(range(1, len(values) + 1), values, line, marker=marker, color=color[r["size"]],
                    label=f"{r['size']} {METHOD_NAMES.get(r['method'], r['method'])}")
        ax.set_xlabel("loop step")
        ax.set_ylabel("next-token accuracy")
        ax.set_title(f"Accuracy per loop step by size: {title}")
    report.save_figure(plt, fig, paths[0], legend_size=6)

    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        methods = [m for m in results["methods"] if m in reports[size]]
        report.draw_exit_tradeoff(ax, [reports[size][m] for m in methods],
                                  labels=[METHOD_NAMES.get(m, m) for m in methods],
                                  styles=[(*_METHOD_LINES.get(m, ("-.", "x")), _METHOD_COLORS.get(m, "black"))
                                          for m in methods], annotate=False)
        ax.set_title(f"{size}: accuracy vs compute")
    report.save_figure(plt, fig, paths[1], legend_size=5)

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    gains = [g for g in results["gains"]]
    xs = [g["params"] if g["params"] else i + 1 for i, g in enumerate(gains)]
    for key, label, marker in (("hard_accuracy", "hard tokens, last step", "o"),
                               ("exit_hard_accuracy", "hard tokens, Q-exit", "s"),
                               ("matched_accuracy", "all tokens, matched compute", "^")):
        ax.plot(xs, [float("nan") if g[key] is None else g[key] for g in gains], "-", marker=marker, label=label)
    for x, g in zip(xs, gains):
        ax.annotate(g["size"], (x, 0), fontsize=7, textcoords="offset points", xytext=(0, -12), ha="center")
    ax.axhline(0.0, color="black", linewidth=0.8)
    if gains and all(g["params"] for g in gains):
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
    else:
        ax.set_xlabel("size")
    ax.set_ylabel("accuracy gain, LoopRPT - continued LM")
    ax.set_title("LoopRPT's gain over continued LM pre-training by size")
    report.save_figure(plt, fig, paths[2])
    return paths


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", choices=sorted(SWEEPS), default="cpu",
                   help="the sizes and defaults: cpu (4 CPU presets) or ouro (Ouro-width models for GPUs)")
    p.add_argument("--sizes", nargs="+", default=None,
                   help="sizes to run, by name: the sweep's or any --model-size preset (default: all of the sweep's)")
    p.add_argument("--methods", nargs="+", choices=sorted(experiment.METHOD_FLAGS), default=None)
    p.add_argument("--out", default=None, help="output directory (cpu: runs/scaling, ouro: runs/scaling_ouro)")
    for name in ("stage1-iters", "continue-iters", "save-interval", "eval-iters", "micro-batch-size",
                 "global-batch-size"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--data-path", nargs="+", default=None,
                   help="a Megatron blend list (default on cpu: the quickstart's corpus, built under OUT/data)")
    p.add_argument("--tokenizer-type", default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--split", default=None)
    p.add_argument("--launcher", default=None,
                   help="command prefix that starts pretrain_looprpt.py and tools/evaluate.py, e.g. "
                        "\"torchrun --nproc-per-node 8\" (cpu default: this Python)")
    p.add_argument("--train-flags", default=None, help="extra pretrain_looprpt.py flags for every training stage")
    p.add_argument("--stage1-flags", default=None, help="extra pretrain_looprpt.py flags for stage 1 (last)")
    p.add_argument("--eval-flags", default=None, help="extra tools/evaluate.py flags")
    difficulty = p.add_mutually_exclusive_group()
    difficulty.add_argument("--difficulty-quantiles", type=float, nargs=2, metavar=("Q1", "Q2"), default=None,
                            help="difficulty thresholds at these quantiles of the stage-1 model's entropy "
                                 "(default: 0.5 0.8, so the hardest 20%% of tokens are hard)")
    difficulty.add_argument("--difficulty-thresholds", type=float, nargs=2, metavar=("T1", "T2"), default=None,
                            help="fixed difficulty thresholds in nats instead of quantiles")
    p.add_argument("--matched-steps", type=float, default=None,
                   help="compute budget (average loop steps) for 'accuracy at matched compute' "
                        "(default: per size, the fewest Q-exit steps among the methods)")
    p.add_argument("--collect-only", action="store_true", help="only collect the existing reports")
    return p


def config_from_args(a: argparse.Namespace) -> SweepConfig:
    cfg = profile(a.sweep)
    if a.sizes:
        by_name = {s.name: s for s in cfg.sizes}
        cfg.sizes = [by_name.get(name, Size(name, name)) for name in a.sizes]
    if a.methods:
        cfg.methods = tuple(a.methods)
    for name in ("out", "stage1_iters", "continue_iters", "save_interval", "eval_iters", "micro_batch_size",
                 "global_batch_size", "data_path", "tokenizer_type", "tokenizer_model", "split", "matched_steps"):
        if getattr(a, name) is not None:
            setattr(cfg, name, getattr(a, name))
    for name in ("launcher", "train_flags", "stage1_flags", "eval_flags"):
        if getattr(a, name) is not None:
            setattr(cfg, name, shlex.split(getattr(a, name)))
    if a.difficulty_quantiles is not None:
        cfg.difficulty_quantiles = tuple(a.difficulty_quantiles)
    if a.difficulty_thresholds is not None:
        cfg.difficulty_quantiles, cfg.difficulty_thresholds = None, tuple(a.difficulty_thresholds)
    if a.sweep != "cpu" and cfg.data_path is None and not a.collect_only:
        raise SweepError("--sweep ouro needs --data-path (and --tokenizer-model): the quickstart corpus is CPU-sized")
    from megatron_looprpt.presets import PRESETS

    for size in cfg.sizes:
        if size.preset not in PRESETS:
            raise SweepError(f"--sizes {size.name}: neither a size of --sweep {a.sweep} "
                             f"({', '.join(s.name for s in SWEEPS[a.sweep])}) nor a preset ({', '.join(PRESETS)})")
    return cfg


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(a)
        if a.collect_only:
            collect(cfg.out, [s.name for s in cfg.sizes], cfg.methods, cfg.matched_steps)
        else:
            run_sweep(cfg)
    except SweepError as error:
        print(f"sweep.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
