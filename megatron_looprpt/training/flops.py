"""FLOPs of a looped model and model FLOPs utilisation.

Megatron-LM's ``num_floating_point_operations`` counts ``num_layers`` once; a looped model runs
its block T times and its output layer and gate after every step, so a token costs
T * N layer passes plus T output layers. Matmul FLOPs only (2 per multiply-add), training =
forward + 2x backward. Causal attention counts the average context, s/2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


_PEAK_TFLOPS = {  # dense, per device
    ("H100", "bf16"): 989.0, ("H100", "fp8"): 1979.0,
    ("H200", "bf16"): 989.0, ("H200", "fp8"): 1979.0,
    ("A100", "bf16"): 312.0,
}


def peak_tflops(precision: str) -> float | None:
    """Peak dense TFLOP/s of this device for ``precision``, or None when unknown (CPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for (gpu, prec), value in _PEAK_TFLOPS.items():
        if gpu in name and prec == precision:
            return value
    return None
