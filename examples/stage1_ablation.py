"""Stage-1 ablation: which choices make a looped model's later loop steps better on text.

    python examples/stage1_ablation.py                      # every arm, 1 seed: ~6 h on 2 CPU cores
    python examples/stage1_ablation.py --arms exit uniform --seeds 1234 1235

Each arm is the quickstart's stage 1 (tiny preset, the quickstart corpus, 16 x 128 tokens per
step, lr 3e-3 -> 3e-4 cosine, warmup 20) with one thing changed; after training, the held-out
cross entropy of every loop step is read from the final validation pass (the quickstart's valid
split, --eval-iters 20 batches: 40,960 tokens). The table lists it per arm (mean and standard
deviation over the seeds), and whether it is non-increasing from step 1 to the last step.
Finished runs are skipped, so a rerun continues where it stopped. Output under
runs/stage1_ablation/ (``--out``): ARM/seedS/log.jsonl, results.md and results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_looprpt.quickstart import STAGE1_ITERS, _common_flags, _prepare_data  # noqa: E402

from depth_study import mean_std  # noqa: E402  (examples/depth_study.py)

# name -> (what changes, flags added to the quickstart's stage 1)
ARMS = {
    "t1": ("T=1, same weights (reference)", ["--loop-steps", "1"]),
    "exit": ("T=4, Ouro's loss, beta 0.05 (the old default)", ["--step-loss-weights", "exit"]),
    "exit-beta0.1": ("T=4, Ouro's loss, beta 0.1 (Ouro's stage-1a value)", ["--step-loss-weights", "exit",
                                                                              "--exit-entropy-coef", "0.1"]),
    "exit-uniform-init": ("T=4, Ouro's loss, gate starting at p(t) = 1/T", ["--step-loss-weights", "exit",
                                                                              "--exit-gate-init", "uniform"]),
    "uniform": ("T=4, backbone on the mean of the per-step losses", ["--step-loss-weights", "uniform"]),
    "last": ("T=4, backbone on the last step's loss only", ["--step-loss-weights", "last"]),
    "progressive": ("T=4, backbone on the per-step losses weighted t / sum(t)", ["--step-loss-weights", "progressive"]),
    "uniform-stepemb": ("T=4, uniform, a learned input vector per loop step (not Ouro's)",
                        ["--step-loss-weights", "uniform", "--loop-step-embedding"]),
    "uniform-inject": ("T=4, uniform, the token embedding re-injected at every step (not Ouro's)",
                       ["--step-loss-weights", "uniform", "--loop-input-injection"]),
    "uniform-residual": ("T=4, uniform, the un-normalised state carried between steps (not Ouro's)",
                         ["--step-loss-weights", "uniform", "--loop-carry", "residual"]),
    "inject-residual": ("T=4, uniform, injection and the un-normalised state carried (not Ouro's)",
                        ["--step-loss-weights", "uniform", "--loop-input-injection", "--loop-carry", "residual"]),
    "progressive-inject": ("T=4, progressive, the token embedding re-injected at every step (not Ouro's)",
                           ["--step-loss-weights", "progressive", "--loop-input-injection"]),
    "inject-stepemb": ("T=4, uniform, injection and a learned input vector per loop step (not Ouro's)",
                       ["--step-loss-weights", "uniform", "--loop-input-injection", "--loop-step-embedding"]),
    "last-inject": ("T=4, last step only, injection", ["--step-loss-weights", "last", "--loop-input-injection"]),
    "last0.7-inject": ("T=4, per-step weights 1,1,1,7 (last:0.7), injection",
                     ["--step-loss-weights", "1,1,1,7", "--loop-input-injection"]),
    "last0.85-inject": ("T=4, per-step weights 1,1,1,17 (last:0.85, the recipe), injection",
                      ["--step-loss-weights", "1,1,1,17", "--loop-input-injection"]),
    "last0.5-inject": ("T=4, per-step weights 1,1,1,3 (last:0.5), injection",
                     ["--step-loss-weights", "1,1,1,3", "--loop-input-injection"]),
    "inject-increase0.5": ("T=4, uniform, injection, step-increase penalty 0.5",
                           ["--step-loss-weights", "uniform", "--loop-input-injection",
                            "--step-increase-penalty", "0.5"]),
    "inject-increase2": ("T=4, uniform, injection, step-increase penalty 2",
                         ["--step-loss-weights", "uniform", "--loop-input-injection",
                          "--step-increase-penalty", "2"]),
    "inject-lr1e-3": ("T=4, uniform, injection, lr 1e-3 -> 1e-4", ["--step-loss-weights", "uniform",
                                                                  "--loop-input-injection", "--lr", "1e-3",
                                                                  "--min-lr", "1e-4"]),
    "uniform-lr1e-3": ("T=4, uniform, lr 1e-3 -> 1e-4", ["--step-loss-weights", "uniform", "--lr", "1e-3",
                                                          "--min-lr", "1e-4"]),
    "uniform-lr3e-4": ("T=4, uniform, lr 3e-4 -> 3e-5", ["--step-loss-weights", "uniform", "--lr", "3e-4",
                                                          "--min-lr", "3e-5"]),
    "exit-lr1e-3": ("T=4, Ouro's loss, lr 1e-3 -> 1e-4", ["--step-loss-weights", "exit", "--lr", "1e-3",
                                                           "--min-lr", "1e-4"]),
    # the token budget: the same arms trained longer
    "t1-1000": ("T=1, 1000 iterations", ["--loop-steps", "1", "--train-iters", "1000"]),
    "exit-1000": ("T=4, Ouro's loss, 1000 iterations", ["--step-loss-weights", "exit", "--train-iters", "1000"]),
    "uniform-1000": ("T=4, uniform, 1000 iterations", ["--step-loss-weights", "uniform", "--train-iters", "1000"]),
    "progressive-1000": ("T=4, progressive, 1000 iterations", ["--step-loss-weights", "progressive",
                                                                "--train-iters", "1000"]),
    "uniform-inject-1000": ("T=4, uniform, injection, 1000 iterations", ["--step-loss-weights", "uniform",
                                                                       "--loop-input-injection",
                                                                       "--train-iters", "1000"]),
    "progressive-inject-1000": ("T=4, progressive, injection, 1000 iterations",
                                ["--step-loss-weights", "progressive", "--loop-input-injection",
                                 "--train-iters", "1000"]),
    # does depth itself pay on text at this budget? (the looped model's compute, unshared)
    "deep-1000": ("8 unshared layers, T=1, 1000 iterations", ["--num-layers", "8", "--loop-steps", "1",
                                                              "--train-iters", "1000"]),
    "exit-beta0.1-1000": ("T=4, Ouro's loss, beta 0.1, 1000 iterations", ["--step-loss-weights", "exit",
                                                                            "--exit-entropy-coef", "0.1",
                                                                            "--train-iters", "1000"]),
}
EVAL_ITERS = 20


def _iterations(arm: str) -> int:
    extra = ARMS[arm][1]
    return int(extra[extra.index("--train-iters") + 1]) if "--train-iters" in extra else STAGE1_ITERS


def _flags(arm: str, data: tuple, seed: int, run_dir: str) -> list:
    """The quickstart's stage-1 flags, then the arm's (argparse keeps the last of a repeated flag)."""
    tokenizer, prefixes = data
    iters = _iterations(arm)
    common = list(_common_flags(tokenizer, prefixes))
    common[common.index("--seed") + 1] = str(seed)
    common[common.index("--eval-iters") + 1] = str(EVAL_ITERS)
    # Ouro's loop unless the arm says otherwise: the arms measured before the tiny preset turned
    # input injection on keep what they measured
    return common + [
        "--no-loop-input-injection",
        "--train-iters", str(iters), "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "20",
        "--eval-interval", str(iters), "--log-interval", "100", "--no-progress-bar",
        "--log-json", os.path.join(run_dir, "log.jsonl"), *ARMS[arm][1],
    ]


def _final_validation(log_path: str):
    if not os.path.exists(log_path):
        return None
    final = None
    with open(log_path) as f:
        for line in f:
            record = json.loads(line)
            if "validation" in record:
                final = {"iteration": record["iteration"], **record["validation"]}
    return final


def run_arm(arm: str, seed: int, data: tuple, out: str) -> dict:
    run_dir = os.path.join(out, arm, f"seed{seed}")
    log_path = os.path.join(run_dir, "log.jsonl")
    flags = _flags(arm, data, seed, run_dir)
    done = _final_validation(log_path)
    if done is not None and done["iteration"] == _iterations(arm):
        return done
    os.makedirs(run_dir, exist_ok=True)
    if os.path.exists(log_path):
        os.remove(log_path)  # an interrupted run starts again: these runs keep no checkpoints
    start = time.time()
    subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_looprpt.py"), *flags], check=True,
                   stdout=open(os.path.join(run_dir, "stdout.log"), "w"), stderr=subprocess.STDOUT)
    result = _final_validation(log_path)
    print(f"[ablation] {arm} seed {seed}: {time.time() - start:.0f}s, per-step CE "
          f"{[round(x, 3) for x in result['step_loss']]}", flush=True)
    return result


def _cell(stats: tuple, seeds: int) -> str:
    """Mean ± std over seeds; the mean alone for one seed, which has no spread to show."""
    return f"{stats[0]:.3f} ± {stats[1]:.3f}" if seeds > 1 else f"{stats[0]:.3f}"


def table(results: dict, seeds: list) -> tuple:
    rows, lines = {}, [
        f"Held-out cross entropy per loop step after stage 1 (mean ± std over seeds {', '.join(map(str, seeds))}; "
        f"{EVAL_ITERS} batches of 16 x 128 tokens of the quickstart corpus's valid split)", "",
        "| arm | what changes | step 1 | step 2 | step 3 | step 4 | lm loss | non-increasing |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm, per_seed in results.items():
        steps = list(zip(*[r["step_loss"] for r in per_seed]))
        stats = [mean_std(values) for values in steps]
        means = [m for m, _ in stats]
        monotone = all(b <= a for a, b in zip(means, means[1:]))
        lm = mean_std([r["lm_loss"] for r in per_seed])
        cells = [_cell(x, len(per_seed)) for x in stats] + [""] * (4 - len(stats))
        lines.append(f"| {arm} | {ARMS[arm][0]} | " + " | ".join(cells) +
                     f" | {_cell(lm, len(per_seed))} | {'yes' if monotone else 'no'} |")
        rows[arm] = {"description": ARMS[arm][0], "flags": ARMS[arm][1], "step_loss": stats, "lm_loss": lm,
                     "non_increasing": monotone, "seeds": seeds}
    return "\n".join(lines), rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[1234])
    p.add_argument("--out", default=os.path.join("runs", "stage1_ablation"))
    p.add_argument("--data-dir", default=os.path.join("runs", "quickstart"),
                   help="where the quickstart corpus is (built there if missing)")
    args = p.parse_args(argv)
    data = _prepare_data(args.data_dir)
    start = time.time()
    results = {arm: [run_arm(arm, seed, data, args.out) for seed in args.seeds] for arm in args.arms}
    text, rows = table(results, args.seeds)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(text)
    print(f"\n[ablation] {time.time() - start:.0f}s; results in {args.out}/results.md")


if __name__ == "__main__":
    main()
