"""Evaluate a looped-LM checkpoint: per-step accuracy/NLL by difficulty, Q-exit sweep, Pareto frontier.

    python tools/evaluate.py --load runs/ckpt --data-path data/text_text_document --eval-iters 20
    torchrun --nproc-per-node 4 tools/evaluate.py --load runs/ckpt --tensor-model-parallel-size 2 \
        --pipeline-model-parallel-size 2 --compare runs/other_ckpt --output-dir eval/

Model shape, tokenizer, data path, split and batch sizes default to the checkpoint's run; any
TP/PP/DP layout gives the same numbers. Difficulty buckets come from the next-token entropy of a
reference model: by default the --load model itself at its last loop step, or --reference CKPT;
the thresholds are fixed (--difficulty-thresholds, nats) or quantiles of that entropy over the
evaluated tokens (--difficulty-quantiles). --eval-iters is capped at what one pass over the
held-out split holds, so that no token is scored twice.
Writes OUTPUT_DIR/evaluation.json, per_step_accuracy.png and accuracy_vs_steps.png (plots when
matplotlib is installed) and prints a table.
"""

import argparse
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, _REPO_ROOT)

from megatron_looprpt.import_notes import silence_import_notes  # noqa: E402
from megatron_looprpt.deferred_compile import defer_megatron_compiles  # noqa: E402

silence_import_notes()
defer_megatron_compiles()

from megatron_looprpt.evaluation.metrics import (  # noqa: E402
    DEFAULT_DIFFICULTY_THRESHOLDS,
    DEFAULT_EXIT_THRESHOLDS,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True,
                   help="checkpoint to evaluate (a save directory or one iter_* directory)")
    p.add_argument("--data-path", nargs="*", default=None,
                   help="indexed dataset prefix or blend (default: the checkpoint's)")
    p.add_argument("--split", default=None,
                   help="train,valid,test document proportions (default: the checkpoint's)")
    p.add_argument("--split-name", choices=["valid", "test"], default="valid",
                   help="the held-out split to evaluate (default: valid)")
    p.add_argument("--eval-iters", type=int, default=10,
                   help="global batches to evaluate, at most as many as the split holds (default: 10)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="default: the checkpoint's (so every layout evaluates the same sequences)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size of this evaluation")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP size of this evaluation")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="shard activations along the sequence over TP ranks")
    p.add_argument("--exit-thresholds", type=float, nargs="+", default=list(DEFAULT_EXIT_THRESHOLDS),
                   help="Q-exit thresholds q to sweep (default: 0.1 0.2 ... 1.0)")
    p.add_argument("--exit-threshold", type=float, default=None,
                   help="the default q, also broken down by difficulty "
                        "(default: the checkpoint's --exit-threshold)")
    difficulty = p.add_mutually_exclusive_group()
    difficulty.add_argument("--difficulty-thresholds", type=float, nargs=2, metavar=("T1", "T2"),
                            default=list(DEFAULT_DIFFICULTY_THRESHOLDS),
                            help="reference entropy in nats: easy < T1 <= medium < T2 <= hard (default: 1 3)")
    difficulty.add_argument("--difficulty-quantiles", type=float, nargs=2, metavar=("Q1", "Q2"), default=None,
                            help="thresholds at these quantiles of the reference entropy over every evaluated "
                                 "token instead, e.g. 0.5 0.8: the hardest 20%% are hard")
    p.add_argument("--reference", default=None,
                   help="checkpoint whose next-token entropy at its last loop step defines difficulty "
                        "(default: the --load model itself)")
    p.add_argument("--compare", default=None,
                   help="a second checkpoint, evaluated on the same data and difficulty buckets")
    p.add_argument("--tokenizer-model", default=None,
                   help="the tokenizer file, if it moved since the checkpoint was trained")
    p.add_argument("--task-data", default=None,
                   help="also score prompt/completion JSONL problems (e.g. the composition task's held-out set): "
                        "answer accuracy per loop step and per --task-group-key value")
    p.add_argument("--task-group-key", default="k",
                   help="the JSONL field the task's accuracy is broken down by (default: k, the hops)")
    p.add_argument("--output-dir", default="evaluation",
                   help="where the JSON report and plots go (default: ./evaluation)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_looprpt import parallel
    from megatron_looprpt.arguments import ConfigError
    from megatron_looprpt.evaluation import report
    from megatron_looprpt.evaluation.runner import EvalConfig, run_evaluation
    from megatron_looprpt.training.checkpointing import CheckpointError

    cfg = EvalConfig(**{name: value for name, value in vars(args).items() if name != "output_dir"})
    cfg.exit_thresholds = tuple(cfg.exit_thresholds)
    cfg.difficulty_thresholds = tuple(cfg.difficulty_thresholds)
    if cfg.difficulty_quantiles is not None:
        cfg.difficulty_quantiles = tuple(cfg.difficulty_quantiles)
    try:
        result = run_evaluation(cfg)
    except (ConfigError, CheckpointError) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2
    finally:
        parallel.destroy()
    # Every rank holds the same report; one writes it.
    if int(os.environ.get("RANK", "0")) == 0:
        path = report.write_json(result, args.output_dir)
        plots = report.write_plots(result, args.output_dir)
        print(report.format_table(result))
        print(f"\nreport: {path}")
        print("plots: " + (", ".join(plots) if plots is not None
                           else "skipped (matplotlib is not installed: pip install matplotlib)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
