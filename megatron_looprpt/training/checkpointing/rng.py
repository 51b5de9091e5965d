"""Random generator states: one ``ShardedObject`` per (pp, tp, dp) rank, restored only under the
layout that saved them (another layout has other generators)."""

from __future__ import annotations

import random
from typing import Any, Dict, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_looprpt.device import use_cuda

RNG_KEY = "rng_state"


def current_layout() -> Dict[str, int]:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(with_context_parallel=True),
        "world_size": dist.get_world_size(),
    }


def same_layout(saved: Dict[str, int], now: Dict[str, int]) -> bool:
    return all(saved[k] == now[k] for k in ("tp", "pp", "dp"))


def _layout_ranks() -> Tuple[int, int, int]:
    return (parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(with_context_parallel=True))


def get_rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's state as plain python + a tensor so it loads with weights_only=True
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "torch_cpu": torch.get_rng_state(),
        "tracker": {name: state.clone() for name, state in get_cuda_rng_tracker().get_states().items()},
    }
    if use_cuda() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and use_cuda():
        torch.cuda.set_rng_state(state["torch_cuda"])
    get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})


def rng_sharded_object(data) -> ShardedObject:
    """This rank's generators (``data``; None to describe what a load fills in)."""
    layout = current_layout()
    return ShardedObject(RNG_KEY, data, (layout["pp"], layout["tp"], layout["dp"]), _layout_ranks(),
                         replica_id=0)
