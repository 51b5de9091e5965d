"""Run logging: a console line per interval, one JSON object per iteration, TensorBoard and
wandb when installed, a progress bar when attached to a terminal. Only the last rank of the
first pipeline/tensor group writes (metrics are identical on every rank after reduction).

As in Megatron-LM, the console, TensorBoard and wandb show each --log-interval's average:
losses and other per-iteration values are means over the interval's iterations, rates
(tokens/s, TFLOP/s, MFU) are totals over the interval's elapsed time, and the learning rate is
the last one. ``--log-json`` keeps every iteration's own values."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, Optional

import torch.distributed as dist


class RunLogger:
    def __init__(self, log_interval: int, train_iters: int, json_path: Optional[str] = None,
                 tensorboard_dir: Optional[str] = None, wandb_project: Optional[str] = None,
                 wandb_name: Optional[str] = None, wandb_dir: Optional[str] = None,
                 progress_bar: bool = True, config: Optional[dict] = None):
        self.is_writer = not dist.is_initialized() or dist.get_rank() == 0
        self.log_interval = log_interval
        self.train_iters = train_iters
        self.progress_bar = progress_bar and sys.stderr.isatty()
        self.interval = IntervalAverage()
        self.json_file = None
        self.tensorboard = None
        self.wandb = None
        if not self.is_writer:
            return
        if json_path:
            os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
            self.json_file = open(json_path, "a", buffering=1)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(log_dir=tensorboard_dir)
            except ImportError:
                self.info("tensorboard is not installed (pip install -e .[tensorboard]); skipping it")
        if wandb_project:
            try:
                import wandb

                # Offline unless the user configured a mode (WANDB_MODE) themselves.
                os.environ.setdefault("WANDB_MODE", "offline")
                self.wandb = wandb.init(project=wandb_project, name=wandb_name, dir=wandb_dir,
                                        config=config or {})
            except ImportError:
                self.info("wandb is not installed (pip install -e .[wandb]); skipping it")
        self._start = time.time()

    def info(self, message: str) -> None:
        if self.is_writer:
            print(message, flush=True)

    def iteration(self, record: Dict) -> None:
        if not self.is_writer:
            return
        iteration = record["iteration"]
        if self.json_file:
            self.json_file.write(json.dumps(record) + "\n")
        self.interval.add(record)
        if iteration % self.log_interval == 0 or iteration == self.train_iters:
            average = self.interval.pop()
            scalars = {k: v for k, v in average.items() if isinstance(v, (int, float)) and k != "iteration"}
            if self.tensorboard:
                for name, value in scalars.items():
                    self.tensorboard.add_scalar(f"train/{name}", value, iteration)
            if self.wandb:
                self.wandb.log(scalars, step=iteration)
            if self.progress_bar:
                sys.stderr.write("\r\033[K")
            print(format_line(average, self.train_iters), flush=True)
        elif self.progress_bar:
            done = iteration / max(self.train_iters, 1)
            bar = "#" * int(30 * done)
            sys.stderr.write(f"\r[{bar:<30}] {iteration}/{self.train_iters} loss {record.get('lm_loss', 0):.4f}")
            sys.stderr.flush()

    def evaluation(self, iteration: int, record: Dict) -> None:
        if not self.is_writer:
            return
        if self.json_file:
            self.json_file.write(json.dumps({"iteration": iteration, "validation": record}) + "\n")
        if self.tensorboard:
            for name, value in record.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"valid/{name}", value, iteration)
        if self.wandb:
            self.wandb.log({f"valid/{k}": v for k, v in record.items() if isinstance(v, (int, float))},
                           step=iteration)
        steps = " ".join(f"{v:.3f}" for v in record.get("step_loss", []))
        print(f" validation at iteration {iteration}: lm loss {record['lm_loss']:.4f} | "
              f"ppl {record['ppl']:.2f} | objective {record['objective']:.4f} | per-step loss [{steps}] | "
              f"Q-exit loss {record['qexit_loss']:.4f} | exit step {record['exit_step']:.2f}",
              flush=True)

    def close(self) -> None:
        if self.json_file:
            self.json_file.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


# Per-iteration rates: averaged over an interval weighted by each iteration's elapsed time,
# i.e. total work over total time. Values kept as the interval's last.
_RATES = ("tokens_per_sec", "tflops_per_device", "mfu")
_TIME = ("iteration_time", "elapsed_s")
_LAST = ("iteration", "lr")


class IntervalAverage:
    """Accumulates iteration records and returns their interval average (see the module
    docstring); lists (per-step losses) are averaged element-wise."""

    def __init__(self):
        self.records = []

    def add(self, record: Dict) -> None:
        self.records.append(record)

    def pop(self) -> Dict:
        records, self.records = self.records, []
        time_key = next((key for key in _TIME if key in records[-1]), None)
        times = [r.get(time_key) or 0.0 for r in records] if time_key else []
        average = {}
        for key, last in records[-1].items():
            values = [r[key] for r in records if r.get(key) is not None]
            if key in _LAST or not values or not isinstance(last, (int, float, list)) or isinstance(last, bool):
                average[key] = last
            elif key in _RATES and time_key and sum(times) > 0:
                average[key] = sum(r[key] * t for r, t in zip(records, times) if r.get(key) is not None) / sum(times)
            elif isinstance(last, list):
                average[key] = [sum(column) / len(column) for column in zip(*values)]
            else:
                average[key] = sum(values) / len(values)
        return average


def format_line(record: Dict, train_iters: int) -> str:
    if "lm_loss" not in record:  # token-level RL (grpo, rltt, rpt): rollouts, not corpus batches
        return " | ".join([
            f" iteration {record['iteration']:>6}/{train_iters}",
            f"reward mean {record['reward_mean']:.4f}", f"answer length {record['answer_length']:.1f}",
            f"pg loss {record['pg_loss']:.4f}", f"kl {record['kl']:.5f}",
            f"clipped {record['clip_fraction']:.3f}", f"lr {record['lr']:.3e}",
            f"grad norm {record['grad_norm']:.3f}", f"{record['elapsed_s']:.1f} s",
        ])
    steps = " ".join(f"{v:.3f}" for v in record.get("step_loss", []))
    parts = [
        f" iteration {record['iteration']:>6}/{train_iters}",
        f"lm loss {record['lm_loss']:.4f}",
        f"objective {record['objective']:.4f}",
        f"per-step loss [{steps}]",
        f"Q-exit loss {record['qexit_loss']:.4f}",
        f"exit step {record['exit_step']:.2f} (Q-exit {record['qexit_steps']:.2f})",
        f"lr {record['lr']:.3e}",
        f"grad norm {record['grad_norm']:.3f}",
        f"tokens/s {record['tokens_per_sec']:.0f}",
        f"TFLOP/s/device {record['tflops_per_device']:.3f}",
    ]
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    for key in ("reward_mean", "pg_loss", "kl_loss"):
        if key in record:
            parts.append(f"{key.replace('_', ' ')} {record[key]:.4f}")
    return " | ".join(parts)
