"""The looped GPT model (Ouro architecture) on megatron-core.

Token embedding, then ONE block of N transformer layers whose weights are shared across T loop
steps. After every step the final norm is applied; its output is what the per-step head reads
(the output layer, vocab-parallel, and the exit gate) and, as in Ouro, what the next step
consumes (``--loop-carry residual`` carries the un-normalised state instead).

One instance is one pipeline stage: it holds N/PP of the block's layers (all of them without
pipeline parallelism), the embedding on the first stage and the final norm, output layer and
gate on the last stage. Without pipeline parallelism ``forward`` runs all T steps; with it,
``forward(loop_step=v)`` runs one pass of this stage's layers for loop step v and the pipeline
schedule carries the hidden state around the ring T times (see ``pipeline.py``).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_looprpt.models import vocab_parallel
from megatron_looprpt.models.exit_gate import ExitGate


@dataclass(frozen=True)
class HeadRequest:
    """What the per-step head computes besides the gate logits.

    ``label_logprobs`` needs labels and is the only thing training needs; it is computed without
    keeping the step's logits (they are recomputed in backward when ``recompute`` is set), so T
    steps never hold T full-vocabulary tensors at once.
    """

    label_logprobs: bool = True
    entropy: bool = False
    predictions: bool = False
    hidden: bool = False
    logits: bool = False
    recompute: bool = True
    # Loop steps (0-based) whose vocabulary head runs; None = every step. Gate logits are
    # always computed. Inference that exits at a fixed step, and benchmarks that compare the
    # looped block with an unshared stack, run the output layer once.
    vocab_steps: Optional[tuple] = None
    # Noisy latent rollouts (LoopRPT): called as rollout_noise(step, latent, exit_gate,
    # seq_offset) with the local latent [s_local, b, h] (this rank's slice, starting at position
    # seq_offset; with its graph, so that a policy gradient can reach the backbone), it returns
    # the gate logits of G perturbed copies, [G, s_local, b].
    rollout_noise: Optional[Callable] = None


@dataclass
class StepOutput:
    """Outputs of one loop step, positions laid out [b, s]."""

    gate_logits: torch.Tensor
    label_logprobs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    predictions: Optional[torch.Tensor] = None
    # The post-norm latent the head reads (and, but for --loop-carry residual, the next step
    # consumes), [s, b, h] (sequence-sharded under SP).
    hidden: Optional[torch.Tensor] = None
    # Vocab-parallel logits [b, s, V/tp]; only on request.
    logits: Optional[torch.Tensor] = None
    # Gate logits recomputed on G noisy copies of the latent, [G, b, s].
    rollout_gate_logits: Optional[torch.Tensor] = None


@dataclass
class LoopedOutput:
    steps: list = field(default_factory=list)

    def stack(self, name: str) -> torch.Tensor:
        """Stack one field over loop steps: [T, ...]."""
        return torch.stack([getattr(step, name) for step in self.steps], dim=0)


class _AddDeferredGrad(torch.autograd.Function):
    """Identity on the carried state whose backward also hands the head's input the gradient
    accumulated on its detached twin.

    On the last pipeline stage, step v < T-1's head reads a detached copy of its input (its loss
    is only formed at step T-1, after the carried state has already left for the next loop). By
    the time the schedule back-propagates step v on this stage, the loss backward has filled the
    twin's ``.grad``; this passes it to the head's input (the carried state itself, or the final
    norm's output read from it under ``--loop-carry residual``) beside the gradient arriving
    from the next loop.
    """

    @staticmethod
    def forward(ctx, carried, head_input, twin):
        ctx.twin = twin
        # A new tensor on the carried state's data, not a view of it: this is the chunk's
        # output, which megatron frees after sending (deallocate_pipeline_outputs), and it
        # refuses to free a view (schedules.deallocate_output_tensor asserts out._base is None).
        out = torch.empty((1,), dtype=carried.dtype, device=carried.device)
        out.data = carried.data
        return out

    @staticmethod
    def backward(ctx, grad):
        twin_grad = ctx.twin.grad
        ctx.twin = None
        return grad, twin_grad, None


def _unit_rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x scaled to root-mean-square 1 over the hidden dimension (no weight): the injected
    embedding enters on the scale of the normalised state it is added to."""
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


class LoopedGPTModel(LanguageModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_spec: ModuleSpec,
        final_norm_spec,
        vocab_size: int,
        max_sequence_length: int,
        loop_steps: int,
        pre_process: bool = True,
        post_process: bool = True,
        share_embeddings_and_output_weights: bool = False,
        rotary_base: int = 10000,
        loops_inside: bool = True,
        exit_gate_step_bias: bool = False,
        loop_step_embedding: bool = False,
        loop_input_injection: bool = False,
        loop_carry: str = "normed",
        output_layer_config: Optional[TransformerConfig] = None,
    ):
        super().__init__(config=config)
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.loop_steps = loop_steps
        self.loops_inside = loops_inside
        self.pre_process = pre_process
        self.post_process = post_process
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.model_type = ModelType.encoder_or_decoder
        self.position_embedding_type = "rope"
        self.input_tensor = None
        # Head outputs of steps whose loss is formed later (last pipeline stage only).
        self._deferred_steps = [collections.deque() for _ in range(loop_steps)]

        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=vocab_size,
                max_sequence_length=max_sequence_length,
                position_embedding_type="none",
            )
        # --loop-step-embedding: a learned vector per loop step added to the block's input, so
        # that the shared weights can tell the steps apart (Universal Transformer's timestep
        # signal; Ouro has none). It lives where every step's input enters: the first stage.
        self.loop_step_embedding = None
        if pre_process and loop_step_embedding:
            self.loop_step_embedding = torch.nn.Parameter(
                torch.zeros(loop_steps, config.hidden_size, dtype=config.params_dtype))
            # each TP rank sees its own slice of the sequence under SP: sum the gradient over TP
            setattr(self.loop_step_embedding, "sequence_parallel", config.sequence_parallel)
        # --loop-input-injection: every step after the first also reads the token embedding
        # (Huginn's and looped-transformer input injection; Ouro has none).
        self.loop_input_injection = loop_input_injection
        # --loop-carry: what the next step consumes. normed = the final norm's output (Ouro);
        # residual = the block's un-normalised residual stream, as in an unshared stack of T*N
        # layers (the heads still read the final norm's output).
        assert loop_carry in ("normed", "residual"), loop_carry
        self.loop_carry = loop_carry
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=1.0,
            rotary_interleaved=config.rotary_interleaved,
            rotary_base=rotary_base,
            use_cpu_initialization=config.use_cpu_initialization,
        )
        # The block always reads its input from the forward argument: this model decides
        # whether that is the embedding, the previous stage's output or the previous loop.
        self.decoder = TransformerBlock(
            config=config, spec=layer_spec, pre_process=True, post_process=False,
            post_layer_norm=False,
        )
        if post_process:
            self.final_layernorm = build_module(
                final_norm_spec, config=config, hidden_size=config.hidden_size,
                eps=config.layernorm_epsilon,
            )
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                vocab_size,
                # megatron's own linear layer: its fusions can differ from the TE layers' (builder)
                config=output_layer_config or config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=False,
                skip_weight_param_allocation=pre_process and share_embeddings_and_output_weights,
            )
            self.exit_gate = ExitGate(config, loop_steps if exit_gate_step_bias else None)
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    # -- pipeline plumbing ------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list):
            assert len(input_tensor) == 1, "the looped model takes one input tensor"
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        loop_step: Optional[int] = None,
        head: HeadRequest = HeadRequest(),
        inference_contexts: Optional[list] = None,
    ):
        """Run all loop steps (``loop_step=None``) or one step of this pipeline stage.

        Returns a ``LoopedOutput`` where the last step's head runs, otherwise the hidden state
        [s, b, h] to hand to the next stage. ``inference_contexts``: one megatron-core inference
        context (KV cache) per loop step, for generation (``inference/generation.py``); the
        positions given are appended at the caches' offset.
        """
        steps = range(self.loop_steps) if loop_step is None else [loop_step]
        embedded = None
        if self.pre_process and steps[0] == 0:
            hidden = embedded = self.embedding(input_ids=input_ids, position_ids=position_ids)
        else:
            hidden = self.input_tensor
        seq_len = input_ids.shape[1] if input_ids is not None else labels.shape[1]
        if inference_contexts is not None:
            # the whole cache's positions: megatron-core's attention slices them at its offset
            seq_len = inference_contexts[0].max_sequence_length
        rotary_pos_emb = self.rotary_pos_emb(seq_len)
        labels_sb = labels.transpose(0, 1).contiguous() if labels is not None else None

        output = LoopedOutput()
        for step in steps:
            if self.pre_process and step > 0 and self.loop_input_injection:
                if embedded is None:  # under PP each loop step is a call of its own
                    embedded = self.embedding(input_ids=input_ids, position_ids=position_ids)
                hidden = hidden + _unit_rms(embedded)
            if self.loop_step_embedding is not None:
                hidden = hidden + self.loop_step_embedding[step]
            hidden = self.decoder(
                hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                inference_context=None if inference_contexts is None else inference_contexts[step],
            )
            if not self.post_process:
                continue
            normed = self.final_layernorm(hidden)
            carried = hidden if self.loop_carry == "residual" else normed
            is_last_step = step == self.loop_steps - 1
            if loop_step is None or is_last_step:
                output.steps.append(self._step_head(normed, labels_sb, head, step))
                hidden = carried
            else:
                twin = normed.detach().requires_grad_(normed.requires_grad)
                self._deferred_steps[step].append(self._step_head(twin, labels_sb, head, step))
                hidden = (_AddDeferredGrad.apply(carried, normed, twin) if normed.requires_grad
                          else carried)
        if not self.post_process or (loop_step is not None and loop_step != self.loop_steps - 1):
            return hidden
        if loop_step is not None:
            deferred = [self._deferred_steps[v].popleft() for v in range(self.loop_steps - 1)]
            output.steps = deferred + output.steps
        return output

    def _step_head(self, hidden, labels_sb, head: HeadRequest, step: int) -> StepOutput:
        result = StepOutput(gate_logits=self._gate_full_sequence(hidden, step).transpose(0, 1))
        if head.rollout_noise is not None:
            rollout_logits = head.rollout_noise(step, hidden, self.exit_gate, self._sequence_offset(hidden))
            result.rollout_gate_logits = self._gather_sequence(rollout_logits).transpose(-1, -2)
        if head.hidden:
            result.hidden = hidden
        vocab_outputs = self._vocab_outputs(labels_sb, head)
        if vocab_outputs and (head.vocab_steps is None or step in head.vocab_steps):
            if head.recompute and torch.is_grad_enabled() and hidden.requires_grad and not head.logits:
                values = torch.utils.checkpoint.checkpoint(
                    self._vocab_head, hidden, labels_sb, vocab_outputs, use_reentrant=False
                )
            else:
                values = self._vocab_head(hidden, labels_sb, vocab_outputs)
            for name, value in zip(vocab_outputs, values):
                setattr(result, name, value.transpose(0, 1))
        return result

    def _gate_full_sequence(self, hidden: torch.Tensor, step: int) -> torch.Tensor:
        """Gate logits [s, b] after loop step ``step`` over the whole sequence (gathered under SP)."""
        return self._gather_sequence(self.exit_gate(hidden, step))

    def _gather_sequence(self, gate_logits: torch.Tensor) -> torch.Tensor:
        """Gate logits [..., s_local, b] -> [..., s, b]: SP splits the sequence."""
        if not self.config.sequence_parallel:
            return gate_logits
        seq_dim = gate_logits.dim() - 2
        if seq_dim:
            gate_logits = gate_logits.movedim(seq_dim, 0)
        gate_logits = gather_from_sequence_parallel_region(gate_logits, tensor_parallel_output_grad=False)
        return gate_logits.movedim(0, seq_dim) if seq_dim else gate_logits

    def _sequence_offset(self, hidden: torch.Tensor) -> int:
        """Position of this rank's first latent in the sequence: SP splits the sequence."""
        if not self.config.sequence_parallel:
            return 0
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_rank() * hidden.shape[0]

    @staticmethod
    def _vocab_outputs(labels_sb, head: HeadRequest) -> tuple:
        wanted = []
        if head.label_logprobs and labels_sb is not None:
            wanted.append("label_logprobs")
        for name in ("entropy", "predictions", "logits"):
            if getattr(head, name):
                wanted.append(name)
        return tuple(wanted)

    def _vocab_head(self, hidden, labels_sb, names: tuple):
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight)
        values = {}
        if not torch.is_grad_enabled() and "label_logprobs" in names and "entropy" in names:
            values["label_logprobs"], values["entropy"] = vocab_parallel.label_log_probs_and_entropy(logits, labels_sb)
        for name in names:
            if name in values:
                continue
            if name == "entropy":
                values[name] = vocab_parallel.entropy(logits)
            elif name == "predictions":
                values[name] = vocab_parallel.argmax(logits)
            elif name == "logits":
                values[name] = logits
        if "label_logprobs" in names and "label_logprobs" not in values:
            # megatron's vocab-parallel cross entropy works in place on its input to save
            # memory: run it last, and on a copy only when the caller keeps the logits.
            ce_input = logits.clone() if "logits" in names else logits
            values["label_logprobs"] = vocab_parallel.label_log_probs(ce_input, labels_sb)
        return tuple(values[name] for name in names)

    def clear_deferred_steps(self) -> None:
        """Drop head outputs of unfinished microbatches (after a failed or forward-only pass)."""
        for queue in self._deferred_steps:
            queue.clear()
