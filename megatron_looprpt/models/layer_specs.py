"""Ouro's sandwich transformer layer on megatron-core.

Ouro normalises both the input and the output of attention and of the MLP before the residual
add: ``x + norm2(attn(norm1(x)))`` and ``x + norm4(mlp(norm3(x)))``. megatron-core's
TransformerLayer has the input norms; the output norms are folded into its bias-dropout-add so
that the rest of the layer (recompute, offload, TE fusions of the input norm) stays megatron's.
"""

from dataclasses import dataclass, fields
from typing import Union

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_looprpt.models.norm import RMSNorm


@dataclass
class SandwichLayerSubmodules(TransformerLayerSubmodules):
    post_self_attn_layernorm: Union[ModuleSpec, type] = IdentityOp
    post_mlp_layernorm: Union[ModuleSpec, type] = IdentityOp


def _normalise_before_residual(bias_dropout_add_factory, norm):
    """Wrap megatron's bias-dropout-add so the branch output is normalised before the add."""

    def factory(training, fused):
        bias_dropout_add = bias_dropout_add_factory(training, fused)

        def apply(x_with_bias, residual, prob):
            x, bias = x_with_bias
            if bias is not None:
                x = x + bias
            return bias_dropout_add((norm(x), None), residual, prob)

        return apply

    return factory


class SandwichTransformerLayer(TransformerLayer):
    def __init__(self, config, submodules: SandwichLayerSubmodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.post_self_attn_layernorm = build_module(
            submodules.post_self_attn_layernorm,
            config=self.config,
            hidden_size=self.config.hidden_size,
            eps=self.config.layernorm_epsilon,
        )
        self.post_mlp_layernorm = build_module(
            submodules.post_mlp_layernorm,
            config=self.config,
            hidden_size=self.config.hidden_size,
            eps=self.config.layernorm_epsilon,
        )
        self.self_attn_bda = _normalise_before_residual(
            self.self_attn_bda, self.post_self_attn_layernorm
        )
        self.mlp_bda = _normalise_before_residual(self.mlp_bda, self.post_mlp_layernorm)


def final_norm_module(transformer_impl: str):
    if transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return RMSNorm


def sandwich_layer_spec(transformer_impl: str = "local") -> ModuleSpec:
    """Layer spec of the looped block: megatron's GPT layer plus Ouro's two output norms."""
    if transformer_impl == "transformer_engine":
        base = get_gpt_layer_with_transformer_engine_spec()
    elif transformer_impl == "local":
        base = get_gpt_layer_local_spec(normalization="RMSNorm")
        base.submodules.input_layernorm = RMSNorm
        base.submodules.pre_mlp_layernorm = RMSNorm
    else:
        raise ValueError(f"--transformer-impl {transformer_impl!r}: use 'local' or 'transformer_engine'")
    inherited = {f.name: getattr(base.submodules, f.name) for f in fields(TransformerLayerSubmodules)}
    norm = final_norm_module(transformer_impl)
    return ModuleSpec(
        module=SandwichTransformerLayer,
        submodules=SandwichLayerSubmodules(
            **inherited, post_self_attn_layernorm=norm, post_mlp_layernorm=norm
        ),
    )
