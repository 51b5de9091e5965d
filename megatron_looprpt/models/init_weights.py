"""Weight initialisation that does not depend on the parallel layout.

Every parameter is drawn from a generator seeded by (seed, checkpoint key, global layer index),
as a full global tensor, and each rank keeps its own slice. The same seed therefore gives the
same model under any TP/PP/DP layout (what the layout-parity tests and scaling studies rely
on), and tied weights, which share a checkpoint key, start equal on every stage.
"""

from __future__ import annotations

import math
import zlib

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from megatron_looprpt.models.exit_gate import uniform_prior_step_bias

_ONES = ("layernorm.weight", "layer_norm_weight", "norm.weight")
_DEPTH_SCALED = ("linear_proj.weight", "linear_fc2.weight")


def _leaves(state_dict):
    for value in state_dict.values():
        if isinstance(value, dict):
            yield from _leaves(value)
        elif isinstance(value, ShardedTensorFactory):
            built = value.build()
            yield from _leaves(built if isinstance(built, dict) else {"_": built})
        elif isinstance(value, (list, tuple)):
            yield from _leaves(dict(enumerate(value)))
        elif isinstance(value, ShardedTensor):
            yield value
        elif not isinstance(value, ShardedObject):
            raise TypeError(f"unexpected entry in the sharded state dict: {type(value).__name__}")


def _fill(key: str, shape, generator, std: float, depth: int) -> torch.Tensor:
    if key.endswith(_ONES):
        return torch.ones(shape)
    if key.endswith("exit_gate.step_bias"):
        return uniform_prior_step_bias(shape[0])
    if key.endswith(("bias", "loop_step_embedding")):  # zero: a new model starts as Ouro's
        return torch.zeros(shape)
    scale = std / math.sqrt(2.0 * depth) if key.endswith(_DEPTH_SCALED) else std
    return torch.randn(shape, generator=generator) * scale


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int, std: float, effective_depth: int) -> None:
    """Initialise ``model`` (one pipeline stage) in place.

    Output projections of attention and MLP get std / sqrt(2 * effective_depth), Megatron's
    scaled init; for a looped model the depth a token sees is N * T.
    """
    for sharded in _leaves(model.sharded_state_dict()):
        prepend = sharded.prepend_axis_num
        layer_index = tuple(sharded.global_offset[:prepend])
        seed_material = f"{seed}|{sharded.key}|{layer_index}".encode()
        generator = torch.Generator().manual_seed(zlib.crc32(seed_material))
        full_shape = tuple(sharded.global_shape[prepend:])
        full = _fill(sharded.key, full_shape, generator, std, effective_depth)
        local = full[tuple(
            slice(offset, offset + size)
            for offset, size in zip(sharded.global_offset[prepend:], sharded.local_shape)
        )]
        sharded.data.copy_(local.to(sharded.data.dtype))
