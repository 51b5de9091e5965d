"""Command-line arguments of pretrain_looprpt.py: Megatron-LM names, presets, validation.

Validation runs before anything is built and raises ConfigError with one line that names the
flag and what would fix it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from typing import Optional, Sequence

from megatron_looprpt.presets import PRESETS


class ConfigError(ValueError):
    """An invalid or inconsistent argument; the message is one line naming the flag."""


def _te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_looprpt.py",
        description="Pre-train looped language models (Ouro) and run LoopRPT on megatron-core. "
                    "Without arguments: the CPU quickstart.",
    )
    # Shape flags default to None so that presets fill only what the user did not give.
    g = p.add_argument_group("model")
    g.add_argument("--model-size", choices=sorted(PRESETS), default=None,
                   help="preset shape; explicit shape flags override it (default: tiny when no shape is given)")
    g.add_argument("--num-layers", type=int, default=None, help="layers in the shared block (N)")
    g.add_argument("--hidden-size", type=int, default=None, help="model width h")
    g.add_argument("--num-attention-heads", type=int, default=None, help="attention heads")
    g.add_argument("--num-query-groups", type=int, default=None, help="GQA groups (default: heads)")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="SwiGLU width (default: 4*hidden)")
    g.add_argument("--seq-length", type=int, default=None, help="training sequence length")
    g.add_argument("--max-position-embeddings", type=int, default=None, help="longest sequence RoPE is set up for (default: --seq-length)")
    g.add_argument("--rotary-base", type=int, default=None, help="RoPE theta (default 10000; Ouro: 1000000)")
    g.add_argument("--norm-epsilon", type=float, default=1e-6, help="RMSNorm epsilon")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None, help="separate input embedding and output layer (default, as Ouro)")
    g.add_argument("--tie-embeddings-and-output-weights", dest="untie_embeddings_and_output_weights",
                   action="store_false", help="share the input embedding and the output layer")
    g.add_argument("--init-method-std", type=float, default=0.02, help="std of the normal init (output projections scaled by 1/sqrt(2 N T))")
    g.add_argument("--attention-dropout", type=float, default=0.0, help="dropout on attention probabilities")
    g.add_argument("--hidden-dropout", type=float, default=0.0, help="dropout on the residual branches")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default=None,
                   help="default: transformer_engine when importable, else local")

    g = p.add_argument_group("loop")
    g.add_argument("--loop-steps", type=int, default=None, help="T: applications of the shared block (default 4)")
    g.add_argument("--exit-entropy-coef", type=float, default=0.05, help="beta of Ouro's stage-1 loss")
    g.add_argument("--exit-threshold", type=float, default=0.9, help="q of Q-exit (and LoopRPT's t_ref)")
    g.add_argument("--exit-gate-training", choices=["stage1", "stage2"], default="stage1",
                   help="stage2: Ouro's gate-only training from per-step loss improvements")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4, help="sequences per micro-batch per data-parallel rank")
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x DP")
    g.add_argument("--train-iters", type=int, default=100, help="optimizer steps to train (counting resumed ones)")
    g.add_argument("--seed", type=int, default=1234, help="seed of weights, data order and LoopRPT noise (the same model under every layout)")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and activations, fp32 master weights and grad reduction")
    g.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default=None, help="FP8 GEMMs via Transformer Engine (needs --bf16 and --transformer-impl transformer_engine)")

    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warmup iterations")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine", help="decay after warmup")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="Adam beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP size: stages split the looped block's layers; the loop goes around the ring T times")
    g.add_argument("--sequence-parallel", action="store_true", help="shard activations along the sequence over TP ranks")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="shard optimizer state (and fp32 master weights) over data-parallel ranks")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None, help="prefix, or a blend: w1 prefix1 w2 prefix2 ...")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions of the documents")
    g.add_argument("--mock-data", action="store_true", help="synthetic data (megatron's MockGPTDataset) instead of --data-path")
    g.add_argument("--tokenizer-type", choices=["SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer"],
                   default="SentencePieceTokenizer")
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece .model or tokenizer.json")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="pad the vocabulary to a multiple of this x TP (Megatron's rule)")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory to write (atomically: temp name, then rename)")
    g.add_argument("--load", default=None, help="checkpoint directory to resume from (any TP/PP layout)")
    g.add_argument("--save-interval", type=int, default=None, help="iterations between checkpoints (a final one is always written)")
    g.add_argument("--ckpt-keep", type=int, default=None, help="keep the newest N checkpoints")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true", help="fail when --load has no checkpoint instead of starting from scratch")
    g.add_argument("--no-load-optim", action="store_true", help="do not restore optimizer and scheduler state")
    g.add_argument("--no-load-rng", action="store_true", help="do not restore RNG state")
    g.add_argument("--finetune", action="store_true", help="load weights only, restart iteration count")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10, help="iterations between console lines")
    g.add_argument("--eval-interval", type=int, default=None, help="iterations between validation passes (0: none)")
    g.add_argument("--eval-iters", type=int, default=10, help="global batches per validation pass")
    g.add_argument("--log-json", default=None, help="one JSON object per iteration")
    g.add_argument("--tensorboard-dir", default=None, help="TensorBoard event directory (when tensorboard is installed)")
    g.add_argument("--wandb-project", default=None, help="wandb project (offline unless WANDB_MODE says otherwise)")
    g.add_argument("--wandb-exp-name", default=None, help="wandb run name")
    g.add_argument("--wandb-save-dir", default=None, help="wandb directory")
    g.add_argument("--no-progress-bar", action="store_true", help="no progress bar even on a terminal")

    g = p.add_argument_group("reinforcement pre-training")
    g.add_argument("--rl-algo", choices=["none", "looprpt"], default="none", help="looprpt: reinforcement pre-training on the loop steps; none: plain pre-training")
    g.add_argument("--rl-hard-token-ratio", type=float, default=0.2, help="fraction of each sequence's tokens (highest teacher entropy) the RL terms use")
    g.add_argument("--rl-num-rollouts", type=int, default=8, help="G noisy latent rollouts per token")
    g.add_argument("--rl-latent-noise-std", type=float, default=0.1, help="std of the Gaussian latent noise (drop probability for dropout)")
    g.add_argument("--rl-noise-type", choices=["gaussian", "dropout"], default="gaussian", help="how latents are perturbed")
    g.add_argument("--rl-reward-scale", type=float, default=1.0, help="multiplies the step-wise reward")
    g.add_argument("--rl-time-penalty", type=float, default=0.02, help="lam_base")
    g.add_argument("--rl-time-penalty-scale", type=float, default=0.5, help="lam_scale")
    g.add_argument("--rl-ema-decay", type=float, default=0.995, help="teacher = decay * teacher + (1 - decay) * student after each step")
    g.add_argument("--rl-pg-coef", type=float, default=1.0, help="weight of the policy-gradient term")
    g.add_argument("--rl-model-coef", type=float, default=1.0, help="weight of the advantage-weighted backbone CE")
    g.add_argument("--rl-entropy-coef", type=float, default=0.01, help="weight of the exit-distribution entropy bonus")
    g.add_argument("--rl-kl-coef", type=float, default=0.001, help="weight of the k3 KL to the teacher")
    return p


_SHAPE_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "seq_length", "max_position_embeddings", "loop_steps",
                "rotary_base", "untie_embeddings_and_output_weights")


def apply_preset(args) -> None:
    """Fill shape flags the user did not give from --model-size (tiny when nothing is given)."""
    if args.model_size is None and all(getattr(args, f) is None for f in ("num_layers", "hidden_size")):
        args.model_size = "tiny"
    if args.model_size is not None:
        shape = PRESETS[args.model_size].as_flags()
        for name in _SHAPE_FLAGS:
            if getattr(args, name) is None:
                setattr(args, name, shape[name])
        if args.vocab_size is None and args.tokenizer_type == "NullTokenizer":
            args.vocab_size = shape["vocab_size"]
    for name, default in (("loop_steps", 4), ("rotary_base", 10000), ("untie_embeddings_and_output_weights", True)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.num_query_groups is None and args.num_attention_heads is not None:
        args.num_query_groups = args.num_attention_heads
    if args.ffn_hidden_size is None and args.hidden_size is not None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.transformer_impl is None:
        args.transformer_impl = "transformer_engine" if _te_available() else "local"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_args(args, world_size: int) -> None:
    """Check everything that can be checked before building anything; fill derived values."""
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        _require(getattr(args, name) is not None,
                 f"--{name.replace('_', '-')} is required (or choose a --model-size preset)")
    for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                 "seq_length", "micro_batch_size", "train_iters", "tensor_model_parallel_size",
                 "pipeline_model_parallel_size", "loop_steps"):
        value = getattr(args, name)
        _require(value is not None and value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    _require(args.num_attention_heads % tp == 0,
             f"--num-attention-heads {args.num_attention_heads} is not divisible by "
             f"--tensor-model-parallel-size {tp}: choose a TP size that divides the head count")
    _require(args.num_query_groups % tp == 0,
             f"--num-query-groups {args.num_query_groups} is not divisible by "
             f"--tensor-model-parallel-size {tp}: choose a TP size that divides the query groups")
    _require(args.num_attention_heads % args.num_query_groups == 0,
             f"--num-attention-heads {args.num_attention_heads} is not divisible by "
             f"--num-query-groups {args.num_query_groups}")
    _require(args.hidden_size % args.num_attention_heads == 0,
             f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
             f"{args.num_attention_heads}")
    _require(args.num_layers % pp == 0,
             f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}: "
             "each stage holds num_layers/PP layers of the looped block")
    _require(args.seq_length <= args.max_position_embeddings,
             f"--seq-length {args.seq_length} exceeds --max-position-embeddings {args.max_position_embeddings}")
    _require(world_size % (tp * pp) == 0,
             f"the world size {world_size} is not divisible by --tensor-model-parallel-size x "
             f"--pipeline-model-parallel-size = {tp * pp}: launch a multiple of {tp * pp} processes")
    _require(not args.sequence_parallel or tp > 1,
             "--sequence-parallel needs --tensor-model-parallel-size > 1 (it splits the sequence over TP ranks)")
    if args.sequence_parallel:
        _require(args.seq_length % tp == 0,
                 f"--seq-length {args.seq_length} is not divisible by --tensor-model-parallel-size {tp} "
                 "(needed by --sequence-parallel)")
    dp = world_size // (tp * pp)
    args.data_parallel_size = dp
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    _require(args.global_batch_size % (args.micro_batch_size * dp) == 0,
             f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
             f"{args.micro_batch_size} x data-parallel size {dp}: use a multiple of {args.micro_batch_size * dp}")
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    if pp > 1 and args.loop_steps > 1:
        _require(args.num_microbatches >= pp,
                 f"the looped pipeline (interleaved schedule) needs at least {pp} micro-batches per step, "
                 f"got {args.num_microbatches}: raise --global-batch-size or lower --micro-batch-size")
    _require(0.0 < args.exit_threshold <= 1.0, f"--exit-threshold {args.exit_threshold} must be in (0, 1]")
    _require(args.lr >= args.min_lr, f"--lr {args.lr} is below --min-lr {args.min_lr}")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    _require(args.lr_warmup_iters <= args.lr_decay_iters,
             f"--lr-warmup-iters {args.lr_warmup_iters} exceeds --lr-decay-iters {args.lr_decay_iters}")
    if args.fp8_format is not None:
        _require(args.transformer_impl == "transformer_engine",
                 "--fp8-format needs --transformer-impl transformer_engine")
        _require(args.bf16, "--fp8-format needs --bf16 (FP8 GEMMs with bf16 everywhere else)")
    if args.transformer_impl == "transformer_engine":
        _require(_te_available(), "--transformer-impl transformer_engine: Transformer Engine is not "
                                  "installed (pip install -e .[gpu]) — or use --transformer-impl local")
    _validate_rl(args)
    _validate_data(args)
    _validate_checkpoint_paths(args)
    if args.eval_interval is None:
        args.eval_interval = 0


def _validate_rl(args) -> None:
    if args.rl_algo == "none":
        return
    _require(0.0 < args.rl_hard_token_ratio <= 1.0,
             f"--rl-hard-token-ratio {args.rl_hard_token_ratio} must be in (0, 1]")
    _require(args.rl_num_rollouts >= 2,
             f"--rl-num-rollouts {args.rl_num_rollouts}: GRPO needs at least 2 rollouts per token")
    _require(0.0 <= args.rl_ema_decay < 1.0, f"--rl-ema-decay {args.rl_ema_decay} must be in [0, 1)")
    _require(args.rl_latent_noise_std >= 0.0, "--rl-latent-noise-std must be >= 0")
    if args.rl_noise_type == "dropout":
        _require(args.rl_latent_noise_std < 1.0,
                 "--rl-latent-noise-std is the drop probability with --rl-noise-type dropout: use < 1")


def _validate_data(args) -> None:
    if args.tokenizer_type == "NullTokenizer":
        _require(args.vocab_size is not None, "--tokenizer-type NullTokenizer needs --vocab-size")
    else:
        _require(args.tokenizer_model is not None,
                 f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model (a .model or tokenizer.json)")
        _require(os.path.exists(args.tokenizer_model),
                 f"--tokenizer-model {args.tokenizer_model} does not exist")
    if args.mock_data:
        return
    _require(bool(args.data_path), "--data-path is required (or pass --mock-data for synthetic data)")
    from megatron_looprpt.data.datasets import validate_data_prefixes

    try:
        validate_data_prefixes(args.data_path)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(str(error).splitlines()[0]) from None


def _validate_checkpoint_paths(args) -> None:
    if args.load and args.exit_on_missing_checkpoint:
        _require(os.path.isdir(args.load),
                 f"--load {args.load} does not exist (drop --exit-on-missing-checkpoint to start from scratch)")
    if args.save:
        parent = os.path.dirname(os.path.abspath(args.save))
        _require(os.access(parent, os.W_OK) or os.access(args.save, os.W_OK),
                 f"--save {args.save}: {parent} is not writable")
    if args.save_interval is not None:
        _require(args.save_interval >= 1, "--save-interval must be >= 1")


_CHECKPOINT_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "untie_embeddings_and_output_weights")


def check_checkpoint_shape(args, saved: dict) -> None:
    """Refuse a --load checkpoint of another shape before anything is built. The loop count is
    not part of the shape: the weights do not depend on T."""
    mismatches = [
        f"--{name.replace('_', '-')} {getattr(args, name)} but the checkpoint has {saved[name]}"
        for name in _CHECKPOINT_SHAPE
        if name in saved and saved[name] != getattr(args, name)
    ]
    if saved.get("padded_vocab_size") is not None and getattr(args, "padded_vocab_size", None) is not None:
        if saved["padded_vocab_size"] != args.padded_vocab_size:
            mismatches.append(f"vocabulary {args.padded_vocab_size} (padded) but the checkpoint has "
                              f"{saved['padded_vocab_size']}")
    _require(not mismatches, f"--load {args.load}: model shape differs: " + "; ".join(mismatches))


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None):
    args = build_parser().parse_args(argv)
    apply_preset(args)
    validate_args(args, world_size or int(os.environ.get("WORLD_SIZE", "1")))
    return args
