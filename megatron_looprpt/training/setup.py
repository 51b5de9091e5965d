"""Build what a run optimises with: the optimizer and its LR schedule (the model: models/builder.py)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_looprpt.models.builder import LoopedModelConfig
from megatron_looprpt.models.pipeline import PipelinedModel


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
