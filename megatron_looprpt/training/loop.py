"""The pre-training loop behind pretrain_looprpt.py."""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_looprpt import parallel
from megatron_looprpt.arguments import FP8_RECIPE_FLAGS, ConfigError, check_checkpoint_shape
from megatron_looprpt.data.datasets import build_data_iterator, build_datasets, held_out_batches
from megatron_looprpt.data.global_batches import GlobalBatches
from megatron_looprpt.data.tokenizers import build_tokenizer, model_vocab_size
from megatron_looprpt.device import use_cuda
from megatron_looprpt.models.builder import LoopedModelConfig, build_model
from megatron_looprpt.models.fusions import FusionRequest
from megatron_looprpt.models.loss import ExitLossConfig
from megatron_looprpt.rl.looprpt_loss import LoopRPTConfig
from megatron_looprpt.rl.objective import RolloutConfig, looprpt_train_step, rl_record
from megatron_looprpt.rl.teacher import EMATeacher
from megatron_looprpt.training import checkpointing
from megatron_looprpt.training.flops import FlopShape, peak_tflops, training_flops
from megatron_looprpt.training.logger import RunLogger
from megatron_looprpt.training.objectives import lm_objective
from megatron_looprpt.training.setup import OptimConfig, build_optimizer
from megatron_looprpt.schedule import eval_step, make_forward_step, train_step
from megatron_looprpt.training.token_rl import TokenRLRun


def model_config(args, vocab_size: int) -> LoopedModelConfig:
    return LoopedModelConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        ffn_hidden_size=args.ffn_hidden_size,
        vocab_size=vocab_size,
        max_position_embeddings=args.max_position_embeddings,
        loop_steps=args.loop_steps,
        rotary_base=args.rotary_base,
        norm_epsilon=args.norm_epsilon,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        init_method_std=args.init_method_std,
        attention_dropout=args.attention_dropout,
        hidden_dropout=args.hidden_dropout,
        transformer_impl=args.transformer_impl,
        bf16=args.bf16,
        fp8_format=args.fp8_format,
        # validate_args fills the recipe's settings of an FP8 run and leaves them unset otherwise
        **({name: getattr(args, name) for name in FP8_RECIPE_FLAGS if getattr(args, name) is not None}),
        allowed_fusions=FusionRequest(
            masked_softmax=args.masked_softmax_fusion, bias_swiglu=args.bias_swiglu_fusion,
            rope=args.apply_rope_fusion, gradient_accumulation=args.gradient_accumulation_fusion,
        ),
        tensor_parallel=args.tensor_model_parallel_size,
        pipeline_parallel=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        exit_gate_init=args.exit_gate_init,
        loop_step_embedding=args.loop_step_embedding,
        loop_input_injection=args.loop_input_injection,
        loop_carry=args.loop_carry,
    )


def optim_config(args) -> OptimConfig:
    return OptimConfig(
        lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, use_distributed_optimizer=args.use_distributed_optimizer,
        lr_warmup_iters=args.lr_warmup_iters, lr_decay_iters=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style, global_batch_size=args.global_batch_size,
    )


def _saved_args(args) -> Optional[dict]:
    """The run arguments stored with the --load checkpoint (None: nothing to load), read before
    any model is built or process group started."""
    if not args.load:
        return None
    saved = checkpointing.read_checkpoint_args(args.load)
    if saved is None and args.exit_on_missing_checkpoint:
        raise ConfigError(f"--load {args.load}: no checkpoint found there "
                          "(drop --exit-on-missing-checkpoint to start from scratch)")
    return saved


def _adopt_checkpoint_hf_config(args, saved: Optional[dict]) -> None:
    """A checkpoint converted from Hugging Face carries its source config.json; every checkpoint
    this run saves carries it on, so that the export writes it back whole."""
    if saved and saved.get("hf_config") and not getattr(args, "hf_config", None):
        args.hf_config = saved["hf_config"]


def _adopt_checkpoint_vocab(args, saved: Optional[dict]) -> None:
    """A converted Hugging Face checkpoint may have more vocabulary rows than its tokenizer has
    tokens (the config's vocab_size); without --vocab-size, the model keeps the checkpoint's."""
    if saved and args.vocab_size is None and args.tokenizer_type != "NullTokenizer":
        args.vocab_size = saved.get("vocab_size")


def _global_batches(dataset, args, consumed_samples: int) -> GlobalBatches:
    """Successive global batches of this data-parallel rank, on the device, each loaded while
    the step before it runs."""
    on_gpu = use_cuda()
    # workers compete with the compute for the cores of a CPU run
    num_workers = args.num_workers if args.num_workers is not None else (2 if on_gpu else 0)
    iterator = build_data_iterator(
        dataset, args.micro_batch_size, parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(), consumed_samples,
        num_workers=num_workers, pin_memory=on_gpu,
    )
    return GlobalBatches(iterator, args.num_microbatches)


class LoopRPTRun:
    """The LoopRPT state of a run: the EMA teacher and the algorithm's settings."""

    def __init__(self, args, cfg: LoopedModelConfig, pm, vocab_size: int):
        self.args, self.pm, self.vocab_size = args, pm, vocab_size
        self.teacher = EMATeacher(cfg, pm, seed=args.seed)
        self.cfg = LoopRPTConfig(
            reference_threshold=args.rl_reference_threshold, exit_threshold=args.exit_threshold,
            hard_token_ratio=args.rl_hard_token_ratio, num_rollouts=args.rl_num_rollouts,
            pg_rollout_reduction=args.rl_pg_rollout_reduction, reward_scale=args.rl_reward_scale,
            time_penalty=args.rl_time_penalty, time_penalty_scale=args.rl_time_penalty_scale,
            pg_coef=args.rl_pg_coef, model_coef=args.rl_model_coef,
            entropy_coef=args.rl_entropy_coef, kl_coef=args.rl_kl_coef,
        )
        self.rollout = RolloutConfig(noise_std=args.rl_latent_noise_std, noise_type=args.rl_noise_type,
                                     seed=args.seed, gate_only=args.rl_pg_gate_only)

    def step(self, optimizer, scheduler, batches):
        return looprpt_train_step(self.pm, optimizer, scheduler, self.teacher, batches, self.cfg,
                                  self.vocab_size, self.rollout, self.args.global_batch_size,
                                  self.args.rl_ema_decay)


def pretrain(args) -> dict:
    """Train according to ``args`` (already parsed and validated); returns a summary."""
    saved = _saved_args(args)
    _adopt_checkpoint_vocab(args, saved)
    _adopt_checkpoint_hf_config(args, saved)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    vocab_size = model_vocab_size(tokenizer, args.vocab_size)
    cfg = model_config(args, vocab_size)
    args.padded_vocab_size = cfg.padded_vocab_size
    if saved is not None:
        # a checkpoint of another model shape is refused before anything is built
        check_checkpoint_shape(args, saved)
    parallel.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.seed)
    logger = RunLogger(
        args.log_interval, args.train_iters, json_path=args.log_json,
        tensorboard_dir=args.tensorboard_dir, wandb_project=args.wandb_project,
        wandb_name=args.wandb_exp_name, wandb_dir=args.wandb_save_dir,
        progress_bar=not args.no_progress_bar, config=vars(args),
    )
    pm = build_model(cfg, seed=args.seed, use_distributed_optimizer=args.use_distributed_optimizer,
                     train_gate_only=args.exit_gate_training == "stage2",
                     overlap_grad_reduce=args.overlap_grad_reduce,
                     overlap_param_gather=args.overlap_param_gather,
                     ddp_bucket_size=args.ddp_bucket_size)
    optimizer, scheduler = build_optimizer(pm, cfg, optim_config(args))
    logger.info(_describe(pm, cfg, args))

    rl = LoopRPTRun(args, cfg, pm, vocab_size) if args.rl_algo == "looprpt" else None
    token_rl = TokenRLRun(args, cfg, pm, tokenizer, vocab_size) if args.rl_algo in ("grpo", "rltt", "rpt") else None
    extra_models = ({"teacher": rl.teacher.store} if rl is not None else
                    {"reference": token_rl.reference.store} if token_rl is not None else {})
    iteration, consumed_samples = 0, 0
    if args.load:
        loaded = checkpointing.load_checkpoint(
            args.load, pm, optimizer, scheduler,
            load_optim=not (args.no_load_optim or args.finetune),
            load_rng=not (args.no_load_rng or args.finetune),
            extra_models=extra_models,
        )
        if loaded is not None and not args.finetune:
            iteration = loaded.iteration
            consumed_samples = loaded.state.get("consumed_samples", 0)
        if loaded is not None:
            logger.info(f" loaded checkpoint from {args.load} at iteration {loaded.iteration}")
        if rl is not None:
            # A LoopRPT checkpoint carries its teacher; from a stage-1 (or converted) checkpoint
            # the teacher starts as the student.
            if loaded is not None and "teacher" in loaded.extra_models:
                rl.teacher.publish()
            else:
                rl.teacher.reset_to(pm)
        if token_rl is not None:
            # the reference is the policy token-level RL starts from, kept through resumes
            if loaded is not None and "reference" in loaded.extra_models:
                token_rl.reference.publish()
            else:
                token_rl.reference.reset_to(pm)
    if token_rl is not None:
        return _train_token_rl(args, token_rl, pm, optimizer, scheduler, logger, iteration,
                               consumed_samples, extra_models)

    valid_batches = _validation_batches(args)
    train_ds, valid_ds, _ = build_datasets(
        args.data_path, args.split, args.seq_length, args.seed, tokenizer,
        # every validation reads the same first batches of the valid split
        num_samples=(args.train_iters * args.global_batch_size, max(1, valid_batches * args.global_batch_size), 1),
        mock=args.mock_data,
    )
    train_batches = _global_batches(train_ds, args, consumed_samples)
    exit_cfg = ExitLossConfig(entropy_coef=args.exit_entropy_coef, stage=args.exit_gate_training,
                              step_weights=args.step_loss_weights, exit_threshold=args.exit_threshold,
                              increase_penalty=args.step_increase_penalty)
    forward_step = make_forward_step(partial(lm_objective, cfg=exit_cfg))
    flop_shape = FlopShape(cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads,
                           cfg.num_query_groups or cfg.num_attention_heads,
                           cfg.ffn_hidden_size or 4 * cfg.hidden_size, cfg.padded_vocab_size,
                           args.seq_length, cfg.loop_steps)
    peak = _peak(args)
    tokens_per_iteration = args.global_batch_size * args.seq_length

    checkpointer = _checkpointer(args)

    def save(at_iteration: int) -> None:
        _save(checkpointer, args, at_iteration, consumed_samples, pm, optimizer, scheduler, extra_models, logger)

    last = {}
    with checkpointing.ExitSignals() as signals:
        while iteration < args.train_iters:
            start = time.time()
            batches = train_batches.next_global_batch()
            if rl is None:
                metrics = train_step(pm, optimizer, scheduler, batches, forward_step, args.global_batch_size)
            else:
                metrics = rl.step(optimizer, scheduler, batches)
            elapsed = time.time() - start
            iteration += 1
            consumed_samples += args.global_batch_size
            flops = training_flops(flop_shape, tokens_per_iteration, extra_forward_passes=int(rl is not None))
            tflops = flops / elapsed / 1e12 / dist.get_world_size()
            last = _record(iteration, metrics, elapsed, tokens_per_iteration, tflops, peak)
            if rl is not None:
                last.update(rl_record(metrics))
            logger.iteration(last)
            if not math.isfinite(last["lm_loss"]):
                logger.info(f" loss is {last['lm_loss']} at iteration {iteration}; stopping "
                            "(the last checkpoint is left as it was)")
                raise FloatingPointError(f"non-finite loss at iteration {iteration}")
            if args.eval_interval and valid_batches and valid_ds is not None and iteration % args.eval_interval == 0:
                logger.evaluation(iteration, evaluate(pm, valid_ds, args, forward_step, valid_batches))
            if args.save_interval and iteration % args.save_interval == 0:
                save(iteration)
            if checkpointer is not None:
                checkpointer.poll()
            if signals.received():
                logger.info(f" exit signal received: saving at iteration {iteration} and exiting")
                if not (args.save_interval and iteration % args.save_interval == 0):
                    save(iteration)
                break
    if args.save and iteration == args.train_iters and not (
        args.save_interval and iteration % args.save_interval == 0
    ):
        save(iteration)
    if checkpointer is not None:
        checkpointer.finish()
    logger.close()
    return {"iteration": iteration, "consumed_samples": consumed_samples, **last}


def _peak(args):
    """The device's dense peak for the run's GEMM precision (None: no MFU, e.g. fp32 or CPU)."""
    if args.fp8_format:
        return peak_tflops("fp8")
    return peak_tflops("bf16") if args.bf16 else None


def _checkpointer(args) -> Optional[checkpointing.Checkpointer]:
    if not args.save:
        return None
    return checkpointing.Checkpointer(args.save, keep=args.ckpt_keep, async_save=args.async_save)


def _save(checkpointer, args, at_iteration: int, consumed_samples: int, pm, optimizer, scheduler,
          extra_models, logger) -> None:
    if checkpointer is not None:
        checkpointer.save(at_iteration, pm, optimizer, scheduler,
                          state={"consumed_samples": consumed_samples}, args=vars(args),
                          extra_models=extra_models)
        verb = "started saving" if checkpointer.async_save else "saved"
        logger.info(f" {verb} checkpoint at iteration {at_iteration} to {args.save}")


def _train_token_rl(args, run, pm, optimizer, scheduler, logger, iteration: int, consumed_samples: int,
                    extra_models) -> dict:
    """The GRPO / RLTT / RPT loop: rollouts on prompts instead of batches of the corpus;
    checkpoints, signals and logging as in pre-training."""

    checkpointer = _checkpointer(args)

    def save(at_iteration: int) -> None:
        _save(checkpointer, args, at_iteration, consumed_samples, pm, optimizer, scheduler, extra_models, logger)

    last = {}
    saved_at = None
    with checkpointing.ExitSignals() as signals:
        while iteration < args.train_iters:
            last = run.step(optimizer, scheduler, consumed_samples)
            iteration += 1
            consumed_samples += args.global_batch_size
            last = {"iteration": iteration, **last}
            logger.iteration(last)
            if not math.isfinite(last["pg_loss"]):
                raise FloatingPointError(f"non-finite loss at iteration {iteration}")
            if args.save_interval and iteration % args.save_interval == 0:
                save(iteration)
                saved_at = iteration
            if checkpointer is not None:
                checkpointer.poll()
            if signals.received():
                logger.info(f" exit signal received: saving at iteration {iteration} and exiting")
                break
    if saved_at != iteration:
        save(iteration)
    if checkpointer is not None:
        checkpointer.finish()
    logger.close()
    return {"iteration": iteration, "consumed_samples": consumed_samples, **last}


def _validation_batches(args) -> int:
    """Global batches per validation: --eval-iters, capped at one epoch of the valid split (megatron's
    GPTDataset starts over on a split's documents when asked for more, scoring tokens twice)."""
    if args.mock_data or not args.eval_interval:
        return args.eval_iters
    try:
        batches, _ = held_out_batches(args.data_path, args.split, 1, args.seq_length, args.eval_iters,
                                      args.global_batch_size, verb="validating on")
    except ValueError:
        return 0   # a --split without a valid share: no validation
    return batches


def evaluate(pm, valid_ds, args, forward_step, num_batches: int) -> dict:
    batches = _global_batches(valid_ds, args, consumed_samples=0)
    totals = {}
    for _ in range(num_batches):
        for name, value in eval_step(pm, batches.next_global_batch(), forward_step).items():
            totals[name] = totals.get(name, 0) + value
    record = lm_record(totals)
    record["ppl"] = math.exp(min(record["lm_loss"], 50.0))
    return record


def lm_record(metrics) -> dict:
    """Per-token means of the LM metric sums (``training.objectives``)."""
    n = max(metrics["num_tokens"].item(), 1.0)
    return {
        "lm_loss": metrics["lm_loss"].item() / n,
        "objective": metrics["objective"].item() / n,
        "qexit_loss": metrics["qexit_loss"].item() / n,
        "step_loss": (metrics["step_ce"] / n).tolist(),
        "exit_entropy": metrics["exit_entropy"].item() / n,
        "exit_step": metrics["exit_step"].item() / n,
        "qexit_steps": metrics["qexit_steps"].item() / n,
    }


def _record(iteration, metrics, elapsed, tokens, tflops, peak) -> dict:
    return {
        "iteration": iteration,
        **lm_record(metrics),
        "grad_norm": metrics["grad_norm"].item(),
        "lr": metrics["lr"].item(),
        "tokens_per_sec": tokens / elapsed,
        "tflops_per_device": tflops,
        "mfu": tflops / peak.tflops if peak else None,
        "iteration_time": elapsed,
    }


def _describe(pm, cfg: LoopedModelConfig, args) -> str:
    local = sum(p.numel() for p in pm.model.parameters())
    return (f" looped model: {cfg.num_layers} shared layers x {cfg.loop_steps} loop steps, hidden "
            f"{cfg.hidden_size}, vocab {cfg.padded_vocab_size} (padded) | {local / 1e6:.2f}M parameters "
            f"on this rank | TP={cfg.tensor_parallel} PP={cfg.pipeline_parallel} "
            f"DP={parallel_state.get_data_parallel_world_size()} SP={cfg.sequence_parallel} | "
            f"{args.num_microbatches} micro-batches of {args.micro_batch_size} per step | {_describe_peak(args)}")


def _describe_peak(args) -> str:
    peak = _peak(args)
    if peak is None:
        return "no MFU: no dense peak known for this device and precision"
    precision = "fp8" if args.fp8_format else "bf16"
    return f"MFU against the {peak.sku} dense {precision} peak, {peak.tflops:.0f} TFLOP/s"
