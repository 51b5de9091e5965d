"""Outputs of an evaluation: the JSON report, PNG plots (when matplotlib is installed) and a
console table. Everything reads the report dict ``runner.run_evaluation`` returns; with
``--compare`` it holds two models, which the plots overlay."""

from __future__ import annotations

import json
import os
from typing import List, Optional

from megatron_looprpt.evaluation.metrics import BUCKETS

REPORT_NAME = "evaluation.json"
PER_STEP_PLOT = "per_step_accuracy.png"
EXIT_PLOT = "accuracy_vs_steps.png"
_BUCKET_COLORS = {"all": "black", "easy": "tab:green", "medium": "tab:orange", "hard": "tab:red"}
_MODEL_STYLES = (("-", "o", "tab:blue"), ("--", "s", "tab:purple"))


def model_label(model: dict) -> str:
    name = os.path.basename(os.path.dirname(model["checkpoint"])) or model["checkpoint"]
    return f"{name}@{model['iteration']} ({model['role']})"


def write_json(report: dict, output_dir: str) -> str:
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, REPORT_NAME)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return path


# ---------------------------------------------------------------------------------------------
# plots


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def write_plots(report: dict, output_dir: str) -> Optional[List[str]]:
    """The PNG files written, or None when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return None
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, PER_STEP_PLOT), os.path.join(output_dir, EXIT_PLOT)]
    _plot_per_step(plt, report, paths[0])
    _plot_exit_tradeoff(plt, report, paths[1])
    return paths


def _plot_per_step(plt, report: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for model, (line, marker, _) in zip(report["models"], _MODEL_STYLES):
        steps = [s["step"] for s in model["per_step"]]
        series = {"all": [s["accuracy"] for s in model["per_step"]]}
        series.update({b: [s["by_bucket"][b]["accuracy"] for s in model["per_step"]] for b in BUCKETS})
        for name, values in series.items():
            if all(v is None for v in values):
                continue  # an empty bucket
            share = "" if name == "all" else f" {100 * (model['buckets'][name]['fraction'] or 0):.0f}%"
            ax.plot(steps, [float("nan") if v is None else v for v in values], line, marker=marker,
                    color=_BUCKET_COLORS[name], label=f"{name}{share} — {model_label(model)}")
    ax.set_xlabel("loop step")
    ax.set_ylabel("next-token accuracy")
    ax.set_xticks(steps)
    ax.set_title(f"Accuracy per loop step by difficulty ({_difficulty_rule(report['difficulty'])})")
    save_figure(plt, fig, path)


def _plot_exit_tradeoff(plt, report: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    draw_exit_tradeoff(ax, report["models"])
    ax.set_title("Accuracy vs compute (Q-exit thresholds annotated)")
    save_figure(plt, fig, path)


def draw_exit_tradeoff(ax, models: List[dict], labels: Optional[List[str]] = None,
                       styles=_MODEL_STYLES, annotate: bool = True) -> None:
    """Each model's Q-exit sweep, fixed-depth points and Pareto frontier on one axes: accuracy
    against average loop steps per token."""
    for i, (model, (line, marker, color)) in enumerate(zip(models, styles)):
        label = model_label(model) if labels is None else labels[i]
        sweep = [p for p in model["q_sweep"] if p["accuracy"] is not None]
        ax.plot([p["avg_steps"] for p in sweep], [p["accuracy"] for p in sweep], linestyle="none",
                marker=marker, color=color, alpha=0.6, label=f"Q-exit sweep — {label}")
        if annotate:
            for (x, y), qs in _thresholds_by_point(sweep).items():
                ax.annotate(",".join(qs), (x, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
        fixed = [s for s in model["per_step"] if s["accuracy"] is not None]
        ax.plot([s["step"] for s in fixed], [s["accuracy"] for s in fixed], linestyle="none",
                marker="x", color=color, label=f"fixed depth — {label}")
        frontier = model["pareto_frontier"]
        # Hollow markers ring the sweep's points; without them a one-point frontier is invisible.
        ax.plot([p["avg_steps"] for p in frontier], [p["accuracy"] for p in frontier], line, marker=marker,
                markersize=9, fillstyle="none", color=color, label=f"Pareto frontier — {label}")
    ax.set_xlabel("average loop steps per token")
    ax.set_ylabel("next-token accuracy")


def save_figure(plt, fig, path: str, legend_size: int = 7) -> None:
    """Grid and legend on every axes, then write the PNG and free the figure."""
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _thresholds_by_point(sweep: List[dict]) -> dict:
    """q values grouped by the point they give: thresholds with the same exits share a label
    instead of overprinting each other."""
    groups: dict = {}
    for p in sweep:
        groups.setdefault((p["avg_steps"], p["accuracy"]), []).append(f"{p['q']:g}")
    return groups


# ---------------------------------------------------------------------------------------------
# console


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _difficulty_rule(difficulty: dict) -> str:
    t1, t2 = difficulty["thresholds"]
    nats = f"{t1:.3g}, {t2:.3g} nats"
    if difficulty["quantiles"] is None:
        return nats
    q1, q2 = difficulty["quantiles"]
    return f"quantiles {q1:g}, {q2:g} = {nats}"


def format_table(report: dict) -> str:
    data, difficulty = report["data"], report["difficulty"]
    capped = "" if data["evaluated_batches"] == data["eval_iters"] else (
        f" (--eval-iters {data['eval_iters']} capped: the split holds {data['split_sequences']} sequences)")
    lines = [
        f"split {data['split_name']} of {' '.join(data['data_path'])} (--split {data['split']}): "
        f"{data['evaluated_batches']} x {data['global_batch_size']} sequences of {data['seq_length']} tokens"
        + capped,
        f"difficulty: {difficulty['measure']}, thresholds {_difficulty_rule(difficulty)}; "
        + ", ".join(f"{name} {rule}" for name, rule in difficulty["buckets"].items()),
    ]
    for model in report["models"]:
        lines += ["", _format_model(model)]
    return "\n".join(lines)


def _format_task(task: dict) -> List[str]:
    steps = len(task["all"]["per_step"])
    lines = ["", f"   task {task['task_data']}: answer accuracy per loop step by {task['group_key']}",
             f"   {task['group_key']:>8} {'answers':>8} | " + " ".join(f"{'step ' + str(t + 1):>7}" for t in range(steps))
             + f" | {'Q-exit':>7} {'steps':>5}"]
    for entry in task["groups"] + [{"group": "all", **task["all"]}]:
        lines.append(f"   {entry['group']:>8} {entry['answers']:>8} | "
                     + " ".join(f"{s['accuracy']:>7.4f}" for s in entry["per_step"])
                     + f" | {entry['q_exit']['accuracy']:>7.4f} {entry['q_exit']['avg_steps']:>5.2f}")
    return lines


def _format_model(model: dict) -> str:
    buckets = model["buckets"]
    lines = [
        f"== {model_label(model)}: {model['checkpoint']}",
        f"   {model['num_layers']} layers x {model['loop_steps']} loop steps, hidden {model['hidden_size']}"
        f"{'' if model['rl_algo'] == 'none' else ', ' + model['rl_algo']}; "
        f"{model['num_tokens']} tokens; reference: {model['reference']['description']}",
        f"   lm loss {_fmt(model['lm_loss'])} (ppl {_fmt(model['ppl'], '.2f')}): the expected NLL under "
        f"the exit distribution; NLL at Q-exit (q={model['q_exit']['q']:g}) {_fmt(model['q_exit']['nll'])}",
        "   buckets: " + ", ".join(
            f"{b} {buckets[b]['tokens']} ({100 * (buckets[b]['fraction'] or 0):.1f}%, "
            f"mean H {_fmt(buckets[b]['mean_reference_entropy'], '.2f')})" for b in BUCKETS),
        "",
        f"   {'step':>4} {'acc':>7} {'nll':>7} {'entropy':>7} | "
        + " ".join(f"{b + ' acc':>10}" for b in BUCKETS) + " | "
        + " ".join(f"{b + ' nll':>10}" for b in BUCKETS),
    ]
    for s in model["per_step"]:
        lines.append(
            f"   {s['step']:>4} {_fmt(s['accuracy']):>7} {_fmt(s['nll']):>7} {_fmt(s['entropy']):>7} | "
            + " ".join(f"{_fmt(s['by_bucket'][b]['accuracy']):>10}" for b in BUCKETS) + " | "
            + " ".join(f"{_fmt(s['by_bucket'][b]['nll']):>10}" for b in BUCKETS))
    frontier = {(p["avg_steps"], p["accuracy"]) for p in model["pareto_frontier"]}
    lines += ["", f"   {'q':>5} {'avg steps':>9} {'acc':>7}  frontier"]
    for p in model["q_sweep"]:
        on = "*" if (p["avg_steps"], p["accuracy"]) in frontier else ""
        lines.append(f"   {p['q']:>5g} {_fmt(p['avg_steps'], '.3f'):>9} {_fmt(p['accuracy']):>7}  {on}")
    q = model["q_exit"]
    lines += [
        "",
        f"   Q-exit at q={q['q']:g}: avg steps {_fmt(q['avg_steps'], '.3f')} (expected exit step "
        f"{_fmt(q['expected_exit_step'], '.3f')}), accuracy {_fmt(q['accuracy'])}; by bucket: "
        + ", ".join(f"{b} {_fmt(buckets[b]['avg_exit_steps'], '.2f')} steps / acc "
                    f"{_fmt(buckets[b]['exit_accuracy'])}" for b in BUCKETS),
        "   Pareto frontier: " + ", ".join(
            f"{p['label']} ({p['avg_steps']:.2f}, {p['accuracy']:.4f})" for p in model["pareto_frontier"]),
    ]
    if "task" in model:
        lines += _format_task(model["task"])
    return "\n".join(lines)
