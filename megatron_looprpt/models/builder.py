"""From a model shape to a megatron TransformerConfig, this rank's pipeline stage, and the
initialised, DDP-wrapped, pipelined model a run trains or reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_looprpt.device import use_cuda
from megatron_looprpt.models import fusions
from megatron_looprpt.models.init_weights import init_weights
from megatron_looprpt.models.layer_specs import final_norm_module, sandwich_layer_spec
from megatron_looprpt.models.looped_gpt import LoopedGPTModel
from megatron_looprpt.models.pipeline import PipelinedModel, pipeline_model


@dataclass
class LoopedModelConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int
    ffn_hidden_size: Optional[int] = None
    num_query_groups: Optional[int] = None
    loop_steps: int = 4
    rotary_base: int = 10000
    norm_epsilon: float = 1e-6
    untie_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    transformer_impl: str = "local"
    bf16: bool = False
    fp8_format: Optional[str] = None
    # megatron-core's FP8 recipes; margin, amax history and its reduction apply to "delayed"
    fp8_recipe: str = "delayed"
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    # fusions the run allows; each applies only where its kernel exists (models/fusions.py)
    allowed_fusions: fusions.FusionRequest = fusions.FusionRequest()
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    make_vocab_size_divisible_by: int = 128
    # geometric: Ouro's shared gate (zero bias: p = 1/2, 1/4, ...); uniform: plus a learned
    # per-step bias that starts the exit distribution at 1/T (not exportable to Ouro's format)
    exit_gate_init: str = "geometric"
    # a learned vector per loop step added to the block's input (not exportable to Ouro's format)
    loop_step_embedding: bool = False
    # every step after the first also reads the token embedding (not Ouro's architecture)
    loop_input_injection: bool = False
    # what the next loop step consumes: "normed" (the final norm's output, Ouro) or "residual"
    loop_carry: str = "normed"

    @property
    def padded_vocab_size(self) -> int:
        return pad_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, self.tensor_parallel)


def pad_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron's padding: the next multiple of divisible_by * TP (so that every TP rank holds
    an equal, aligned slice of the vocabulary)."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def transformer_config(cfg: LoopedModelConfig, main_grads: bool = False) -> TransformerConfig:
    """``main_grads``: the model trains inside megatron's DDP, whose fp32 ``main_grad`` buffers
    fused weight-gradient GEMMs can accumulate into (a model without them, such as the EMA
    teacher or an inference model, never fuses that)."""
    on_gpu = use_cuda()
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups or cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=cfg.tensor_parallel,
        pipeline_model_parallel_size=cfg.pipeline_parallel,
        sequence_parallel=cfg.sequence_parallel,
        params_dtype=dtype,
        bf16=cfg.bf16,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        # megatron's own initialisation also tags tensor-parallel weights (which the grad norm
        # and the distributed optimizer read); init_weights then overwrites the values so that
        # they do not depend on the layout.
        perform_initialization=True,
        use_cpu_initialization=not on_gpu,
        # Nothing to fuse: no linear biases and, by default, no dropout on the residual adds.
        bias_dropout_fusion=False,
        # RMSNorm only: megatron's persistent kernel is apex's LayerNorm.
        persist_layer_norm=False,
        **fusions.select(cfg.allowed_fusions, on_gpu=on_gpu, transformer_impl=cfg.transformer_impl,
                         main_grads=main_grads),
        **fp8_settings(cfg),
    )


def fp8_settings(cfg: LoopedModelConfig) -> dict:
    """megatron-core's FP8 fields for ``cfg`` (none without --fp8-format)."""
    if cfg.fp8_format is None:
        return {}
    settings = dict(fp8=cfg.fp8_format, fp8_recipe=cfg.fp8_recipe)
    if cfg.fp8_recipe == "delayed":
        settings.update(fp8_margin=cfg.fp8_margin, fp8_amax_history_len=cfg.fp8_amax_history_len,
                        fp8_amax_compute_algo=cfg.fp8_amax_compute_algo)
    return settings


def build_stage(cfg: LoopedModelConfig, config: Optional[TransformerConfig] = None) -> LoopedGPTModel:
    """This rank's pipeline stage of the looped model (the whole model without PP)."""
    config = config or transformer_config(cfg)
    model = LoopedGPTModel(
        config=config,
        layer_spec=sandwich_layer_spec(cfg.transformer_impl),
        final_norm_spec=final_norm_module(cfg.transformer_impl),
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        loop_steps=cfg.loop_steps,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
        rotary_base=cfg.rotary_base,
        exit_gate_step_bias=cfg.exit_gate_init == "uniform",
        loop_step_embedding=cfg.loop_step_embedding,
        loop_input_injection=cfg.loop_input_injection,
        loop_carry=cfg.loop_carry,
        output_layer_config=fusions.output_layer_config(config),
    )
    if use_cuda():
        model.cuda(torch.cuda.current_device())
    return model


def build_model(cfg: LoopedModelConfig, seed: int, wrap_ddp: bool = True,
                use_distributed_optimizer: bool = False, train_gate_only: bool = False,
                overlap_grad_reduce: bool = True, overlap_param_gather: bool = False,
                ddp_bucket_size: Optional[int] = None) -> PipelinedModel:
    """``train_gate_only``: Ouro's stage 2 freezes the language model and trains the exit gate;
    frozen parameters get no gradient buffer and no optimizer state (so no weight decay).

    ``overlap_grad_reduce``: each DDP bucket's reduction starts during the backward pass, as
    soon as its gradients are complete. That holds for weights used T times: megatron-core
    0.16 counts, per parameter, the gradient-ready hooks of the last micro-batch in the first
    step and from then on starts a bucket only when every parameter has fired that many times
    (param_and_grad_buffer.py, ``register_grad_ready``), and a weight's hook fires once per
    backward call it takes part in: once per micro-batch without PP, once per loop chunk with
    it; the last one comes after every contribution to the weight.
    ``overlap_param_gather`` (distributed optimizer only): the parameter all-gather after a
    step runs during the next forward pass; until then only this rank's shard of the weights
    is current (``PipelinedModel.sync_params`` waits for the rest). ``ddp_bucket_size``:
    parameters per bucket (megatron's default when None)."""
    config = transformer_config(cfg, main_grads=wrap_ddp)
    config.calculate_per_token_loss = True
    model = build_stage(cfg, config)
    init_weights(model, seed=seed, std=cfg.init_method_std,
                 effective_depth=cfg.num_layers * cfg.loop_steps)
    if train_gate_only:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("exit_gate."))
    stage = model
    if wrap_ddp:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=overlap_grad_reduce,
            overlap_param_gather=overlap_param_gather and use_distributed_optimizer,
            use_distributed_optimizer=use_distributed_optimizer,
            bucket_size=ddp_bucket_size,
        )
        stage = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    return pipeline_model(stage, model, cfg.pipeline_parallel)
