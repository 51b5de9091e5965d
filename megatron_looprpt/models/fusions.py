"""Which fused kernels the looped model runs, decided from the device and what is installed.

On the CPU none: the kernels are CUDA's and the unfused paths are the same maths. On a GPU every
fusion megatron-core offers for this architecture, where its kernel exists, unless the run turns
it off (Megatron-LM's ``--no-*-fusion`` flags):

* masked softmax (local attention; Transformer Engine's attention has its own kernels): the
  ``scaled_masked_softmax_cuda`` extensions that apex or Megatron-LM build. megatron-core imports
  them whenever the fusion is on (fusions/fused_softmax.py), so without them it must stay off.
* bias-SwiGLU: megatron-core's jit-fused SwiGLU (torch.compile); there is no bias, the fusion is
  the activation's.
* RoPE: Transformer Engine's fused kernel (megatron-core refuses the flag without it).
* gradient accumulation: the weight-gradient GEMM adds straight into DDP's fp32 ``main_grad``.
  TE layers do it themselves; megatron-core's own linear layers (the local layers, the output
  layer) need apex's ``fused_weight_gradient_mlp_cuda`` (tensor_parallel/layers.py raises
  without it), so the output layer gets a config without the fusion where apex is missing.
  TE *overwrites* ``main_grad`` instead of adding to it in the backward of a call made with
  ``is_first_microbatch=True`` (TE 2.x module/linear.py: ``accumulate = fuse_wgrad_accumulation
  and not is_first_microbatch``). In a looped model that call is loop step 0 of the first
  micro-batch, whose backward runs after steps 1..T-1 of that micro-batch (and, under PP, of
  the whole first group) have added theirs: they would be lost. So with the fusion on, TE layers
  run with ``disable_parameter_transpose_cache`` (megatron-core then passes
  ``is_first_microbatch=None``: always accumulate), at the price of casting FP8 weights on
  every call instead of once per step.
* deallocate_pipeline_outputs: megatron-core frees a chunk's output after sending it to the next
  stage. NCCL's sends keep the buffer alive (the caching allocator records their stream); gloo's
  keep only the tensor whose storage megatron swaps out, so on the CPU it stays off.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass

from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass(frozen=True)
class FusionRequest:
    """The fusions a run allows (all by default); each is used only where it can run."""

    masked_softmax: bool = True
    bias_swiglu: bool = True
    rope: bool = True
    gradient_accumulation: bool = True


def _installed(*modules: str) -> bool:
    # find_spec, not import: importing CUDA extensions or Transformer Engine initialises CUDA
    return all(importlib.util.find_spec(name) is not None for name in modules)


def apex_softmax_available() -> bool:
    return _installed("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda")


def apex_gradient_accumulation_available() -> bool:
    return _installed("fused_weight_gradient_mlp_cuda")


def transformer_engine_available() -> bool:
    return _installed("transformer_engine")


def select(request: FusionRequest, on_gpu: bool, transformer_impl: str, main_grads: bool) -> dict:
    """TransformerConfig fields for the fusions that apply. ``main_grads``: the model trains
    inside megatron's DDP (the fp32 buffers gradient accumulation fuses into)."""
    te = transformer_impl == "transformer_engine"
    grad_accumulation = (on_gpu and main_grads and request.gradient_accumulation
                         and (te or apex_gradient_accumulation_available()))
    return dict(
        masked_softmax_fusion=on_gpu and request.masked_softmax and not te and apex_softmax_available(),
        bias_activation_fusion=on_gpu and request.bias_swiglu,
        apply_rope_fusion=on_gpu and request.rope and transformer_engine_available(),
        gradient_accumulation_fusion=grad_accumulation,
        disable_parameter_transpose_cache=grad_accumulation and te,
        deallocate_pipeline_outputs=on_gpu,
    )


def output_layer_config(config: TransformerConfig) -> TransformerConfig:
    """The config of the vocabulary output layer, a megatron-core ColumnParallelLinear: without
    apex's kernel it must not fuse gradient accumulation, whatever the TE layers do."""
    if not config.gradient_accumulation_fusion or apex_gradient_accumulation_available():
        return config
    config = copy.copy(config)
    config.gradient_accumulation_fusion = False
    return config
