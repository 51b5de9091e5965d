"""The exit gate and the exit distribution over loop steps (Ouro).

After loop step t the gate gives a conditional exit probability lambda_t = sigmoid(g_t). A token
exits at step t with p(t) = lambda_t * prod_{j<t} (1 - lambda_j); the last step takes the mass
that is left, so p sums to one. Everything here works on tensors shaped [T, ...].
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class ExitGate(MegatronModule):
    """hidden -> 1 linear map with bias, replicated on every tensor-parallel rank.

    ``step_bias_steps``: also a learned bias per loop step (``--exit-gate-init uniform``), which
    ``init_weights`` sets so that the exit distribution starts uniform (p(t) = 1/T) instead of
    the geometric (1/2, 1/4, ...) a shared gate starts from. Ouro's gate has no such bias.
    """

    def __init__(self, config: TransformerConfig, step_bias_steps: Optional[int] = None):
        super().__init__(config=config)
        self.weight = torch.nn.Parameter(torch.zeros(1, config.hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))
        params = [self.weight, self.bias]
        self.step_bias = None
        if step_bias_steps is not None:
            self.step_bias = torch.nn.Parameter(torch.zeros(step_bias_steps, dtype=config.params_dtype))
            params.append(self.step_bias)
        # Under sequence parallelism each TP rank sees a different slice of the sequence, so the
        # replicated gate's gradients must be summed across TP (finalize_model_grads does this
        # for parameters carrying this flag).
        for param in params:
            setattr(param, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden: torch.Tensor, step: int = 0) -> torch.Tensor:
        """[..., s, b, h] after loop step ``step`` (0-based) -> gate logits [..., s, b], in fp32."""
        logits = F.linear(hidden.float(), self.weight.float(), self.bias.float()).squeeze(-1)
        if self.step_bias is not None:
            logits = logits + self.step_bias[step].float()
        return logits


def uniform_prior_step_bias(num_steps: int) -> torch.Tensor:
    """Per-step gate logits that make the exit distribution uniform: lambda_t = 1 / (T - t) for
    0-based t (a token still in the loop at step t exits there with that probability); the last
    step takes the rest, whatever its logit."""
    # logit(1 / (T - t)) = -log(T - t - 1)
    return torch.tensor([-math.log(num_steps - t - 1) for t in range(num_steps - 1)] + [0.0])


def exit_log_distribution(gate_logits: torch.Tensor) -> torch.Tensor:
    """log p(t) from gate logits [T, ...], computed in log space for stability."""
    log_exit = F.logsigmoid(gate_logits)
    log_stay = F.logsigmoid(-gate_logits)
    # log prod_{j<t} (1 - lambda_j): an exclusive cumulative sum.
    log_survive = torch.cumsum(log_stay, dim=0) - log_stay
    log_p = log_exit + log_survive
    return torch.cat([log_p[:-1], log_survive[-1:]], dim=0)


def exit_distribution(gate_logits: torch.Tensor) -> torch.Tensor:
    return exit_log_distribution(gate_logits).exp()


def exit_entropy(gate_logits: torch.Tensor) -> torch.Tensor:
    """H(p) over loop steps, per token."""
    log_p = exit_log_distribution(gate_logits)
    return -(log_p.exp() * log_p).sum(dim=0)


def q_exit_steps(exit_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """0-based step at which each token exits: the first whose CDF reaches ``threshold``.

    The last step is used where the CDF never reaches it (possible only through rounding, since
    the CDF of the last step is 1), and always for ``threshold >= 1``: "never exit early", even
    where a saturated gate's CDF rounds to exactly 1 before the last step.
    """
    last = exit_probs.shape[0] - 1
    if threshold >= 1.0:
        return torch.full(exit_probs.shape[1:], last, dtype=torch.long, device=exit_probs.device)
    reached = torch.cumsum(exit_probs, dim=0) >= threshold
    first = torch.argmax(reached.to(torch.int8), dim=0)
    return torch.where(reached.any(dim=0), first, torch.full_like(first, last))


def expected_exit_step(exit_probs: torch.Tensor) -> torch.Tensor:
    """E[t] with steps counted from 1, per token."""
    steps = torch.arange(1, exit_probs.shape[0] + 1, dtype=exit_probs.dtype, device=exit_probs.device)
    return torch.einsum("t...,t->...", exit_probs, steps)
