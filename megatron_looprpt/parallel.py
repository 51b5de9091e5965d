"""Process group and model-parallel initialisation, on GPU (nccl) or CPU (gloo)."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_looprpt.device import compute_device, use_cuda


def initialize(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234,
               timeout_minutes: int = 30) -> torch.device:
    """Start torch.distributed (env:// as torchrun sets it, or a 1-process group) and megatron's
    model-parallel groups; seed the RNGs. Returns the device this rank computes on."""
    if not dist.is_initialized():
        backend = "nccl" if use_cuda() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "WORLD_SIZE" in os.environ:  # launched by torchrun (env:// rendezvous)
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            # A one-process group on a private address: nothing goes into os.environ, so programs
            # this process starts (torchrun jobs, tools) do not inherit a port it holds.
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1, timeout=timeout)
    device = compute_device()
    if device.type == "cpu":
        from megatron_looprpt import cpu_bridge

        cpu_bridge.install()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            distributed_timeout_minutes=timeout_minutes,
        )
    set_seed(seed)
    return device


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    if use_cuda():
        torch.cuda.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    # The tracker fork leaves the default generator advanced on CPU; reseed so every layout
    # starts from the same default-generator state.
    torch.manual_seed(seed)


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
