"""What the benchmark scripts share: the benchmarked model's shape flags and a device-aware timer."""

import argparse
import time


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-attention-heads", type=int, default=8)
    parser.add_argument("--ffn-hidden-size", type=int, default=704)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--loop-steps", type=int, default=4)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)


def timed(fn, device) -> float:
    """Seconds ``fn()`` takes, waiting for the GPU's queue to drain on both sides."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
