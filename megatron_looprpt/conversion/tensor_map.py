"""Which megatron-core checkpoint tensor holds which Hugging Face Ouro tensor, and how.

Canonical form between loaders and savers: Hugging Face names and layouts, with the true
(unpadded) vocabulary. megatron-core stores the N block layers stacked on a leading axis (one
key per kind of weight), the attention projections fused into ``linear_qkv`` (per query group:
that group's query heads, then its key head, then its value head, so that TP splits whole
groups) and the SwiGLU gate and up projections fused into ``linear_fc1`` (gate first). Ouro's
sandwich norms: ``input_layernorm_2`` normalises the attention output and
``post_attention_layernorm_2`` the MLP output before each residual add.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from megatron_looprpt.conversion.architecture import OuroArchitecture

HF_LAYER_PREFIX = "model.layers.{}."

# mcore key (stacked over layers) -> the HF tensors of one layer it is built from.
LAYER_TENSORS: Dict[str, Tuple[str, ...]] = {
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight",),
    "decoder.layers.self_attention.linear_qkv.weight": (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "decoder.layers.self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "decoder.layers.post_self_attn_layernorm.weight": ("input_layernorm_2.weight",),
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm.weight",),
    "decoder.layers.mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "decoder.layers.mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
    "decoder.layers.post_mlp_layernorm.weight": ("post_attention_layernorm_2.weight",),
}
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
# mcore key -> HF name, outside the block.
GLOBAL_TENSORS: Dict[str, str] = {
    EMBEDDING: "model.embed_tokens.weight",
    "final_layernorm.weight": "model.norm.weight",
    "exit_gate.weight": "model.early_exit_gate.weight",
    "exit_gate.bias": "model.early_exit_gate.bias",
    OUTPUT_LAYER: "lm_head.weight",
}
_VOCAB_KEYS = (EMBEDDING, OUTPUT_LAYER)


def global_keys(arch: OuroArchitecture) -> List[str]:
    """The mcore keys outside the block; a tied output layer is the embedding's key."""
    return [k for k in GLOBAL_TENSORS if not (k == OUTPUT_LAYER and arch.tie_word_embeddings)]


def hf_names(arch: OuroArchitecture) -> List[str]:
    """Every tensor of the HF checkpoint, in the order Ouro's modules define them."""
    names = [GLOBAL_TENSORS[EMBEDDING]]
    for i in range(arch.num_layers):
        prefix = HF_LAYER_PREFIX.format(i)
        names += [prefix + n for n in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                       "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                       "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                                       "input_layernorm.weight", "input_layernorm_2.weight",
                                       "post_attention_layernorm.weight", "post_attention_layernorm_2.weight")]
    names += [GLOBAL_TENSORS[k] for k in ("final_layernorm.weight", "exit_gate.weight", "exit_gate.bias")]
    if not arch.tie_word_embeddings:
        names.append(GLOBAL_TENSORS[OUTPUT_LAYER])
    return names


def hf_shapes(arch: OuroArchitecture) -> Dict[str, Tuple[int, ...]]:
    h, v, ffn, hd = arch.hidden_size, arch.vocab_size, arch.intermediate_size, arch.head_dim
    q, kv = arch.num_attention_heads * hd, arch.num_key_value_heads * hd
    per_layer = {
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (ffn, h), "mlp.up_proj.weight": (ffn, h), "mlp.down_proj.weight": (h, ffn),
        "input_layernorm.weight": (h,), "input_layernorm_2.weight": (h,),
        "post_attention_layernorm.weight": (h,), "post_attention_layernorm_2.weight": (h,),
    }
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
              "model.early_exit_gate.weight": (1, h), "model.early_exit_gate.bias": (1,),
              "lm_head.weight": (v, h)}
    for i in range(arch.num_layers):
        shapes.update({HF_LAYER_PREFIX.format(i) + n: s for n, s in per_layer.items()})
    return {name: shapes[name] for name in hf_names(arch)}


def mcore_shape(key: str, arch: OuroArchitecture, padded_vocab: int) -> Tuple[int, ...]:
    """Shape of ``key`` (one layer's slice for stacked keys)."""
    shapes = hf_shapes(arch)
    if key in LAYER_TENSORS:
        parts = [shapes[HF_LAYER_PREFIX.format(0) + n] for n in LAYER_TENSORS[key]]
        return (sum(p[0] for p in parts), *parts[0][1:])
    shape = shapes[GLOBAL_TENSORS[key]]
    return (padded_vocab, *shape[1:]) if key in _VOCAB_KEYS else shape


def to_mcore(key: str, hf: Sequence[torch.Tensor], arch: OuroArchitecture, padded_vocab: int) -> torch.Tensor:
    """The mcore tensor of ``key`` from the HF tensors it maps from (one layer for stacked keys)."""
    if key == "decoder.layers.self_attention.linear_qkv.weight":
        return _fuse_qkv(*hf, arch)
    if key in LAYER_TENSORS:
        return torch.cat(list(hf), dim=0) if len(hf) > 1 else hf[0]
    (tensor,) = hf
    if key in _VOCAB_KEYS:
        return _pad_vocab(tensor, padded_vocab)
    return tensor


def from_mcore(key: str, tensor: torch.Tensor, arch: OuroArchitecture) -> List[torch.Tensor]:
    """The HF tensors (in ``LAYER_TENSORS`` order; one for global keys) held by ``tensor``."""
    if key == "decoder.layers.self_attention.linear_qkv.weight":
        return _split_qkv(tensor, arch)
    if key == "decoder.layers.mlp.linear_fc1.weight":
        return list(torch.chunk(tensor, 2, dim=0))
    if key in _VOCAB_KEYS:
        return [tensor[: arch.vocab_size]]
    return [tensor]


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: OuroArchitecture) -> torch.Tensor:
    groups, hd, h = arch.num_key_value_heads, arch.head_dim, arch.hidden_size
    per_group = arch.num_attention_heads // groups
    return torch.cat([q.reshape(groups, per_group * hd, h), k.reshape(groups, hd, h),
                      v.reshape(groups, hd, h)], dim=1).reshape(-1, h)


def _split_qkv(qkv: torch.Tensor, arch: OuroArchitecture) -> List[torch.Tensor]:
    groups, hd, h = arch.num_key_value_heads, arch.head_dim, arch.hidden_size
    per_group = arch.num_attention_heads // groups
    q, k, v = torch.split(qkv.reshape(groups, (per_group + 2) * hd, h), [per_group * hd, hd, hd], dim=1)
    return [t.reshape(-1, h).contiguous() for t in (q, k, v)]


def _pad_vocab(tensor: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """Megatron's padding rows are zeros (never a target; their logits are masked by the data)."""
    extra = padded_vocab - tensor.shape[0]
    if extra < 0:
        raise ValueError(f"vocabulary {tensor.shape[0]} exceeds the padded size {padded_vocab}")
    return torch.cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])]) if extra else tensor
