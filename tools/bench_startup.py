"""Benchmark: a process's start-up (importing the training path) with and without deferring
megatron-core's ``torch.compile`` decorations to their first call (``deferred_compile.py``).

Each trial starts a fresh interpreter that imports ``megatron_looprpt.training.loop``, what
every rank of ``pretrain_looprpt.py`` imports, and reports the wall time of that import; the two
settings alternate over the trials and the medians are compared.

    python tools/bench_startup.py [--trials 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TRIAL = """
import sys, time
start = time.perf_counter()
if sys.argv[1] == "deferred":
    from megatron_looprpt.deferred_compile import defer_megatron_compiles
    defer_megatron_compiles()
import megatron_looprpt.training.loop
print(time.perf_counter() - start, any(m.startswith("torch._dynamo") for m in sys.modules))
"""


def trial(setting: str) -> tuple:
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", _TRIAL, setting], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}).stdout.split()
    return float(out[0]), out[1] == "True"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=5)
    args = p.parse_args(argv)
    import torch  # noqa: F401  (warm the file cache for both settings alike)

    times = {"plain": [], "deferred": []}
    dynamo = {}
    for _ in range(args.trials):
        for setting in times:
            seconds, dynamo[setting] = trial(setting)
            times[setting].append(seconds)
    medians = {setting: statistics.median(values) for setting, values in times.items()}
    import importlib.metadata as metadata

    result = {"python": sys.version.split()[0], "megatron_core": metadata.version("megatron-core"),
              "trials": args.trials, "median_s": medians, "ratio_deferred_to_plain": medians["deferred"] / medians["plain"],
              "imports_torchdynamo": dynamo}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
