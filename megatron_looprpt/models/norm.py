"""RMSNorm computed the way Ouro computes it, usable under sequence parallelism.

megatron-core's torch-backed norm refuses sequence parallelism and its fused one needs apex, so
the local layer spec uses this module. Statistics are taken in fp32 (as Ouro does) and the
weight is marked ``sequence_parallel`` so that finalize_model_grads all-reduces its gradient
across the tensor-parallel group when activations are sequence-sharded.
"""

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(MegatronModule):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_):
        super().__init__(config=config)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden.dtype
        hidden = hidden.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(input_dtype)
