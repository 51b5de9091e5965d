"""FLOPs of a looped model and model FLOPs utilisation.

Megatron-LM's ``num_floating_point_operations`` counts ``num_layers`` once; a looped model runs
its block T times and its output layer and gate after every step, so a token costs
T * N layer passes plus T output layers. Matmul FLOPs only (2 per multiply-add), training =
forward + 2x backward. Causal attention counts the average context, s/2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_looprpt.device import use_cuda


@dataclass(frozen=True)
class FlopShape:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    seq_length: int
    loop_steps: int


def forward_flops_per_token(shape: FlopShape) -> float:
    h, s = shape.hidden_size, shape.seq_length
    head_dim = h // shape.num_attention_heads
    q_dim = shape.num_attention_heads * head_dim
    kv_dim = shape.num_query_groups * head_dim
    projections = h * (q_dim + 2 * kv_dim) + q_dim * h          # qkv and output projection
    attention = 2 * (s / 2) * q_dim                              # QK^T and AV, causal
    swiglu_mlp = 3 * h * shape.ffn_hidden_size                   # gate, up and down
    per_layer = 2 * (projections + attention + swiglu_mlp)
    per_step_head = 2 * h * shape.vocab_size + 2 * h             # output layer + exit gate
    return shape.loop_steps * (shape.num_layers * per_layer + per_step_head)


def training_flops(shape: FlopShape, tokens: int, extra_forward_passes: int = 0) -> float:
    """FLOPs of one iteration over ``tokens`` tokens; ``extra_forward_passes`` counts no-grad
    passes such as LoopRPT's teacher."""
    return tokens * forward_flops_per_token(shape) * (3 + extra_forward_passes)


@dataclass(frozen=True)
class Peak:
    sku: str            # the table entry the device name matched, e.g. "H100 SXM"
    tflops: float       # dense, per device, for the precision asked


# NVIDIA datasheet figures, dense (the with-sparsity figures halved), per device. Matched against
# torch.cuda.get_device_name() in this order, most specific first: the PCIe and NVL boards run
# at lower clocks and power than SXM, so one "H100" figure would overstate MFU on them.
_PEAKS = (
    # (substring of the device name, SKU, bf16, fp8)
    ("H100 PCIe", "H100 PCIe", 756.0, 1513.0),
    ("H100 NVL", "H100 NVL", 835.0, 1671.0),
    ("H200 NVL", "H200 NVL", 835.0, 1671.0),
    ("GH200", "GH200", 989.0, 1979.0),
    ("H100", "H100 SXM", 989.0, 1979.0),
    ("H200", "H200 SXM", 989.0, 1979.0),
    ("A100", "A100", 312.0, None),
)


def peak_for_device_name(name: str, precision: str) -> Optional[Peak]:
    """The dense peak of the device called ``name`` for ``precision`` ("bf16" or "fp8"), or None
    when the device or the precision is not in the table."""
    for pattern, sku, bf16, fp8 in _PEAKS:
        if pattern in name:
            value = bf16 if precision == "bf16" else fp8
            return Peak(sku, value) if value is not None else None
    return None


def peak_tflops(precision: str) -> Optional[Peak]:
    """This rank's device peak for ``precision``; None on the CPU or an unknown device (no MFU)."""
    if not use_cuda():
        return None
    return peak_for_device_name(torch.cuda.get_device_name(), precision)
