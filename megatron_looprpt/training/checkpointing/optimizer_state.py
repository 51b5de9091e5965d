"""Optimizer state in a checkpoint, for the plain and the distributed optimizer.

The plain optimizer is saved as megatron-core maps it: every Adam moment takes its parameter's
sharding (``optimizer.state.exp_avg.<param key>``), so it reshards across TP/PP/DP like the model.

The distributed optimizer is stored in megatron-core's ``fully_reshardable`` layout: per
parameter one global tensor for each of the fp32 main parameter (``optimizer.state.param.<key>``),
``exp_avg`` and ``exp_avg_sq``, shaped like the parameter, so it too reshards across TP, PP and
DP. megatron-core builds that layout by gathering all DP shards on one rank (over gloo into DP
rank 0's host memory, or all-gathered onto every rank's GPU), and its loader has every DP rank
read the whole state of its model-parallel shard and keep 1/DP of it. Its fully sharded variant
(``fully_sharded_model_space``) needs ``ShardedTensor.flattened_range``, which megatron-core
0.16 through 0.19 reject (``dist_checkpointing/mapping.py``, ``validate_metadata_integrity``).

Here every DP rank writes, and on load reads, only what it owns: its contiguous range of each
flattened parameter, cut into the few rectangular boxes that range covers (megatron-core's
"uneven" sharding: ``axis_fragmentations=None``, checked by torch.distributed.checkpoint). No
gather, no extra copy, and the same keys and global tensors as megatron-core's writer, so either
writer's checkpoint loads with this reader (and with megatron-core's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Tuple

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

SHARDING_TYPE = "fully_reshardable"


def optimizer_metadata(optimizer) -> Dict[str, Any]:
    """What the checkpoint records about the optimizer (and megatron-core's sharding options)."""
    return {
        "distrib_optim_sharding_type": SHARDING_TYPE,
        # without a prefix per chained optimizer: keys match the model's, whatever the chaining
        "chained_optim_avoid_prefix": True,
        "kind": "distributed" if is_distributed(optimizer) else "plain",
    }


def _sub_optimizers(optimizer) -> list:
    return getattr(optimizer, "chained_optimizers", None) or [optimizer]


def is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in _sub_optimizers(optimizer))


def prime(optimizer) -> None:
    """megatron-core quirk: with torch's Adam (no Apex / Transformer Engine) the distributed
    optimizer's ``state_dict()`` asserts that its parameters share one Adam ``step``, so before
    the first step it can neither be saved nor describe the state a load fills in. Give every
    main parameter the state torch's Adam would create on its first step (zero moments, step 0):
    the optimizer then behaves exactly as a fresh one, and a load overwrites all of it."""
    from megatron.core.optimizer import distrib_optimizer

    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return
    for opt in _sub_optimizers(optimizer):
        if not isinstance(opt, distrib_optimizer.DistributedOptimizer):
            continue
        inner = opt.optimizer
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                if len(inner.state[param]) == 0:
                    inner.state[param] = {
                        "step": torch.tensor(0.0, dtype=torch.float32),
                        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                    }


def sharded_state(optimizer, model_sd, is_loading: bool) -> Any:
    """The optimizer's part of the sharded state dict (to save, or to describe a load)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    metadata = {k: v for k, v in optimizer_metadata(optimizer).items() if k != "kind"}
    subs = _sub_optimizers(optimizer)
    if len(subs) > 1:
        optimizer._synchronize_steps()  # as ChainedOptimizer.sharded_state_dict does

    def one(opt):
        if not isinstance(opt, DistributedOptimizer):
            return opt.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
        if is_loading:
            # as megatron-core does: makes sure the state tensors a load fills in exist
            opt.load_state_dict(opt.state_dict())
        state = opt.state_dict()
        state["param_state"] = {str(i): parts for i, (_, parts) in enumerate(_owned_boxes(opt, model_sd))}
        state["param_state_sharding_type"] = SHARDING_TYPE
        return state

    if len(subs) == 1:
        return one(subs[0])
    return {i: one(opt) for i, opt in enumerate(subs)}


def load_state(optimizer, state_dict) -> None:
    """Restore ``optimizer`` from what ``sharded_state(..., is_loading=True)`` was loaded into."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = _sub_optimizers(optimizer)
    if len(subs) == 1:
        pairs = [(subs[0], state_dict)]
    else:
        pairs = [(opt, state_dict[i]) for i, opt in enumerate(subs)]
    for opt, sd in pairs:
        if not isinstance(opt, DistributedOptimizer):
            opt.load_state_dict(sd)
            continue
        sd = dict(sd)
        # absent on a DP rank that owns no parameter (nothing of it was stored or loaded)
        param_state = sd.pop("param_state", {})
        sd.pop("param_state_sharding_type", None)
        opt.load_state_dict(sd)
        for i, (model_param, _) in enumerate(_owned_params(opt)):
            loaded = {k: torch.cat([t.reshape(-1) for t in boxes]) for k, boxes in param_state[str(i)].items()}
            _store(opt, model_param, loaded)
    _unshare_adam_steps(optimizer)
    if len(subs) > 1:
        optimizer._synchronize_steps()


def common_for_consistency_check(common: Dict[str, Any]) -> Dict[str, Any]:
    """What megatron-core compares across ranks before saving the common state: without the
    distributed optimizer's parameter state. Its boxes are all sharded, so nothing of it stays
    in the common state, except on a DP rank that owns no parameter: an empty entry."""
    common = dict(common)
    optim = common.get("optimizer")
    if isinstance(optim, dict) and "param_state" in optim:
        common["optimizer"] = {k: v for k, v in optim.items() if k != "param_state"}
    elif isinstance(optim, dict) and all(isinstance(v, dict) and "param_state" in v for v in optim.values()):
        common["optimizer"] = {i: {k: v for k, v in sub.items() if k != "param_state"}
                               for i, sub in optim.items()}
    return common


# --------------------------------------------------------------------------------------------
# the DP rank's own ranges of the parameters, as boxes
# --------------------------------------------------------------------------------------------
@dataclass
class _Piece:
    """A ShardedTensor of the model (or one a factory builds) and the range of its parameter's
    flattened elements it holds."""

    template: ShardedTensor
    flat_start: int
    numel: int


def _owned_params(opt):
    """(model parameter, its Range within the flattened parameter) this DP rank owns, in the
    optimizer's order."""
    for gbuf_range_maps in opt.gbuf_ranges:
        for gbuf_range_map_for_all_buckets in gbuf_range_maps.values():
            for gbuf_range_map in gbuf_range_map_for_all_buckets:
                for model_param, param_range_map in gbuf_range_map["param_map"].items():
                    yield model_param, param_range_map["param"]


def _owned_boxes(opt, model_sd) -> List[Tuple[torch.Tensor, Dict[str, List[ShardedTensor]]]]:
    """Per owned parameter: {state name: its boxes}, viewing the optimizer's own tensors."""
    tensors_and_factories, _ = extract_sharded_tensors_and_factories(model_sd)
    by_param = {sh.data: sh for sh in nested_values(tensors_and_factories)}
    owned = []
    for model_param, param_range in _owned_params(opt):
        if model_param not in by_param:
            raise ValueError(f"a parameter of shape {tuple(model_param.shape)} the distributed "
                             "optimizer updates is not in the model's sharded state dict")
        sharded = by_param[model_param]
        pieces = _pieces(sharded, model_param)
        replica = _replica_id(sharded)
        states = {k: v for k, v in opt._get_main_param_and_optimizer_states(model_param).items()
                  if torch.is_tensor(v) and v.dim() > 0}  # not torch Adam's scalar step
        parts = {}
        for name, shard in states.items():
            boxes = []
            for piece in pieces:
                boxes += _piece_boxes(piece, shard.reshape(-1), param_range.start, param_range.end,
                                      f"optimizer.state.{name}.", replica)
            parts[name] = boxes
        owned.append((model_param, parts))
    return owned


def _replica_id(sharded):
    # as megatron-core's own model-space format: the model's TP/PP replication, and no DP
    # replication (each DP rank owns different elements)
    replica = sharded.replica_id
    if not (isinstance(replica, tuple) and len(replica) == 3):
        raise ValueError(f"expected a (PP, TP, DP) replica id, got {replica!r} for {sharded.key}")
    return (replica[0], replica[1], 0)


def _pieces(sharded, model_param) -> List[_Piece]:
    """The ShardedTensors a model parameter is saved as, with their flat ranges: itself, or
    what its factory builds (e.g. SwiGLU's two halves), found by building on a meta tensor."""
    if isinstance(sharded, ShardedTensor):
        if tuple(sharded.local_shape) != tuple(model_param.shape):
            raise ValueError(f"{sharded.key}: local shape {sharded.local_shape} differs from its "
                             f"parameter's {tuple(model_param.shape)}")
        return [_Piece(sharded, 0, model_param.numel())]
    if not isinstance(sharded, ShardedTensorFactory):
        raise ValueError(f"{sharded.key}: cannot map optimizer state onto {type(sharded).__name__}")
    probe = torch.empty(model_param.shape, dtype=model_param.dtype, device="meta")
    built = [t for t in nested_values(replace(sharded, data=probe).build()) if isinstance(t, ShardedTensor)]
    pieces = []
    for t in built:
        if not t.data.is_contiguous():
            raise ValueError(f"{sharded.key}: its factory builds a non-contiguous part of the "
                             "parameter, which the distributed optimizer's boxes cannot follow")
        pieces.append(_Piece(t, t.data.storage_offset(), t.data.numel()))
    pieces.sort(key=lambda p: p.flat_start)
    if sum(p.numel for p in pieces) != model_param.numel():
        raise ValueError(f"{sharded.key}: its factory's parts do not cover the parameter")
    return pieces


def _piece_boxes(piece: _Piece, shard: torch.Tensor, owned_start: int, owned_stop: int,
                 prefix: str, replica) -> List[ShardedTensor]:
    """Boxes of ``piece`` within the owned flat range [owned_start, owned_stop) of the
    parameter; ``shard`` holds exactly that range."""
    start = max(owned_start, piece.flat_start)
    stop = min(owned_stop, piece.flat_start + piece.numel)
    t = piece.template
    full_shape = (1,) * t.prepend_axis_num + tuple(t.local_shape)
    boxes, position = [], start - owned_start
    for offset, size in _boxes(full_shape, start - piece.flat_start, stop - piece.flat_start):
        n = math.prod(size)
        data = shard[position:position + n].view(size)
        position += n
        # prepended axes are folded into the box: torch_dist's path for uneven shards takes
        # offsets and sizes with every axis
        boxes.append(ShardedTensor(
            key=prefix + t.key, data=data, dtype=data.dtype, local_shape=tuple(size),
            global_shape=tuple(t.global_shape),
            global_offset=tuple(g + o for g, o in zip(t.global_offset, offset)),
            axis_fragmentations=None, replica_id=replica, prepend_axis_num=0,
            allow_shape_mismatch=t.allow_shape_mismatch))
    return boxes


def _boxes(shape: Tuple[int, ...], start: int, stop: int) -> List[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """(offset, size) boxes that cover exactly the elements [start, stop) of a tensor of
    ``shape`` in row-major order, each one contiguous run of them: at most two per axis."""
    if start >= stop:
        return []
    if not shape:
        return [((), ())]
    inner = math.prod(shape[1:])
    first_row, lead = divmod(start, inner)
    last_row, tail = divmod(stop, inner)
    rest = len(shape) - 1
    if first_row == last_row:
        return [((first_row, *o), (1, *s)) for o, s in _boxes(shape[1:], lead, tail)]
    boxes = []
    if lead:
        boxes += [((first_row, *o), (1, *s)) for o, s in _boxes(shape[1:], lead, inner)]
        first_row += 1
    if last_row > first_row:
        boxes.append(((first_row, *(0,) * rest), (last_row - first_row, *shape[1:])))
    if tail:
        boxes += [((last_row, *o), (1, *s)) for o, s in _boxes(shape[1:], 0, tail)]
    return boxes


def _store(opt, model_param, loaded: Dict[str, torch.Tensor]) -> None:
    """Put the loaded values into the optimizer's tensors for ``model_param``. Every current
    entry is passed on, because ``_set_main_param_and_optimizer_states`` copies each of the
    optimizer's entries (torch Adam's ``step`` too, which the checkpoint keeps in the param
    groups instead)."""
    current = opt._get_main_param_and_optimizer_states(model_param)
    missing = sorted(k for k, v in current.items() if torch.is_tensor(v) and v.dim() > 0 and k not in loaded)
    if missing:
        raise KeyError(f"the checkpoint holds no {', '.join(missing)} for a parameter of shape "
                       f"{tuple(model_param.shape)}")
    with torch.no_grad():
        opt._set_main_param_and_optimizer_states(model_param, {**current, **loaded})


def _unshare_adam_steps(optimizer) -> None:
    """megatron-core quirk: ``DistributedOptimizer.load_state_dict`` gives every parameter the
    *same* ``step`` tensor, and torch's Adam (no Apex / TE) increments each parameter's step in
    place, so after a resume the shared step advanced once per parameter per iteration and the
    bias correction was wrong."""
    for opt in _sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        seen = set()
        for state in inner.state.values():
            step = state.get("step")
            if torch.is_tensor(step):
                if id(step) in seen:
                    state["step"] = step.clone()
                seen.add(id(state["step"]))
