"""Build what a run trains: the wrapped stage model, its optimizer and its LR schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_looprpt.models.builder import LoopedModelConfig, build_stage, transformer_config
from megatron_looprpt.models.init_weights import init_weights
from megatron_looprpt.models.pipeline import PipelinedModel, pipeline_model


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    lr_warmup_iters: int = 0
    lr_decay_iters: int = 1000
    lr_decay_style: str = "cosine"
    global_batch_size: int = 8


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


def build_optimizer(pm: PipelinedModel, cfg: LoopedModelConfig, optim: OptimConfig):
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=cfg.bf16,
        params_dtype=pm.model.config.params_dtype,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(optimizer_config, [pm.stage])
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.lr_warmup_iters > 0 else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_iters * optim.global_batch_size,
        lr_decay_steps=optim.lr_decay_iters * optim.global_batch_size,
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=optim.lr_decay_iters * optim.global_batch_size,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
