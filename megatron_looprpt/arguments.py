"""Command-line arguments of pretrain_looprpt.py: Megatron-LM names, presets, validation.

``parse_args`` = parse, fill the shape from ``--model-size`` (``apply_preset``), then check
everything that can be checked before anything is built and fill the derived values
(``validate_args``). A bad configuration raises ``ConfigError`` with one line that names the
flag and what would fix it. Only the standard library is imported here, so an invalid command
line fails in well under a second, before torch or megatron-core load.

Choices where Megatron-LM's behaviour is not copied:
- Without ``--model-size`` and without any architecture flag (layers, width, heads, query
  groups, ffn), the ``tiny`` preset is used; once one architecture flag is given the shape is
  the user's, and ``--num-layers``, ``--hidden-size``, ``--num-attention-heads`` and
  ``--seq-length`` are required.
- ``--sequence-parallel`` with TP=1 is an error (Megatron-LM silently turns it off): the flag
  would otherwise claim a layout that does not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from typing import List, Optional, Sequence

from megatron_looprpt.presets import PRESETS, ModelShape


# The vocabulary of a --mock-data run that names no tokenizer.
MOCK_VOCAB_SIZE = 4096


class ConfigError(Exception):
    """An invalid or inconsistent argument; the message is one line naming the flag."""


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _te_available() -> bool:
    # find_spec, not import: importing Transformer Engine initialises CUDA, which validation
    # must not do.
    return importlib.util.find_spec("transformer_engine") is not None


# The Transformer Engine version each FP8 recipe needs: megatron-core builds the recipe only
# from these versions on (fp8_utils.get_fp8_recipe).
FP8_RECIPE_MIN_TE = {"delayed": (0,), "tensorwise": (2, 2), "blockwise": (2, 3)}
# Settings of the delayed-scaling recipe, and their defaults (Transformer Engine's own).
_DELAYED_SCALING = {"fp8_margin": 0, "fp8_amax_history_len": 1024, "fp8_amax_compute_algo": "max"}
# Every FP8 recipe flag: a run without --fp8-format (inference included) leaves them unset.
FP8_RECIPE_FLAGS = ("fp8_recipe", *_DELAYED_SCALING)


def _te_version() -> Optional[tuple]:
    """The installed Transformer Engine's version as integers, from its package metadata
    (importing it would initialise CUDA); None when no distribution says."""
    from importlib import metadata

    for distribution in ("transformer-engine", "transformer_engine", "transformer-engine-cu12",
                         "transformer_engine_torch"):
        try:
            text = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
        return _leading_numbers(text)
    return None


def _leading_numbers(version: str) -> tuple:
    """"2.3.0.dev0+abc" -> (2, 3, 0): what the recipe minimums compare against."""
    numbers = []
    for part in version.split("."):
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        numbers.append(int(digits))
        if len(digits) < len(part):
            break
    return tuple(numbers)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_looprpt.py",
        description="Pre-train looped language models (Ouro) and run LoopRPT on megatron-core. "
                    "Without arguments: the CPU quickstart.",
    )
    # Shape flags default to None so that a preset fills only what the user did not give.
    g = p.add_argument_group("model")
    g.add_argument("--model-size", choices=sorted(PRESETS), default=None,
                   help="preset shape; explicit shape flags override it (default: tiny when no "
                        "architecture flag is given)")
    g.add_argument("--num-layers", type=int, default=None, help="layers in the shared block (N)")
    g.add_argument("--hidden-size", type=int, default=None, help="model width h")
    g.add_argument("--num-attention-heads", type=int, default=None, help="attention heads")
    g.add_argument("--num-query-groups", type=int, default=None, help="GQA groups (default: heads)")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="SwiGLU width (default: 4*hidden)")
    g.add_argument("--seq-length", type=int, default=None, help="training sequence length")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="longest sequence RoPE is set up for (default: --seq-length)")
    g.add_argument("--rotary-base", type=int, default=None, help="RoPE theta (default 10000; Ouro: 1000000)")
    g.add_argument("--norm-epsilon", type=float, default=1e-6, help="RMSNorm epsilon")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None,
                   help="separate input embedding and output layer (the default, as Ouro)")
    g.add_argument("--tie-embeddings-and-output-weights", dest="untie_embeddings_and_output_weights",
                   action="store_false", default=None,
                   help="share the input embedding and the output layer")
    g.add_argument("--init-method-std", type=float, default=0.02,
                   help="std of the normal init (output projections scaled by 1/sqrt(2 N T))")
    g.add_argument("--attention-dropout", type=float, default=0.0, help="dropout on attention probabilities")
    g.add_argument("--hidden-dropout", type=float, default=0.0, help="dropout on the residual branches")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default=None,
                   help="default: transformer_engine when installed, else local")

    g = p.add_argument_group("loop")
    g.add_argument("--loop-steps", type=int, default=None, help="T: applications of the shared block (default 4)")
    g.add_argument("--exit-entropy-coef", type=float, default=0.05, help="beta of Ouro's stage-1 loss")
    g.add_argument("--exit-threshold", type=float, default=0.9, help="q of Q-exit")
    g.add_argument("--exit-gate-training", choices=["stage1", "stage2"], default="stage1",
                   help="stage2: Ouro's gate-only training from per-step loss improvements")
    g.add_argument("--exit-gate-init", choices=["geometric", "uniform"], default="geometric",
                   help="the exit distribution a new gate starts from: geometric = Ouro's shared gate with "
                        "zero bias (1/2, 1/4, ...); uniform = plus a learned per-step bias starting it at 1/T "
                        "(such a checkpoint cannot be exported to Hugging Face Ouro)")
    g.add_argument("--step-loss-weights", choices=["exit", "uniform", "progressive", "last"], default="exit",
                   help="stage 1: how the backbone's per-step losses are weighted: exit = by the gate's exit "
                        "distribution (Ouro's loss); uniform = 1/T each; progressive = t / sum(t); last = the last "
                        "step only; for all but exit the gate learns Ouro's exit objective on the detached losses")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4, help="sequences per micro-batch per data-parallel rank")
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x DP")
    g.add_argument("--train-iters", type=int, default=100, help="optimizer steps to train (counting resumed ones)")
    g.add_argument("--seed", type=int, default=1234,
                   help="seed of weights, data order and LoopRPT noise (the same model under every layout)")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 parameters and activations, fp32 master weights and grad reduction")
    g.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default=None,
                   help="FP8 GEMMs via Transformer Engine (needs --bf16 and --transformer-impl transformer_engine)")
    g.add_argument("--fp8-recipe", choices=list(FP8_RECIPE_MIN_TE), default=None,
                   help="megatron-core's FP8 scaling recipe (default delayed; tensorwise needs TE >= 2.2, "
                        "blockwise TE >= 2.3)")
    g.add_argument("--fp8-margin", type=int, default=None, help="delayed scaling: scale margin (default 0)")
    g.add_argument("--fp8-amax-history-len", type=int, default=None,
                   help="delayed scaling: amax history length (default 1024)")
    g.add_argument("--fp8-amax-compute-algo", choices=["max", "most_recent"], default=None,
                   help="delayed scaling: amax from the history's max or its most recent entry (default max)")
    g.add_argument("--no-masked-softmax-fusion", dest="masked_softmax_fusion", action="store_false",
                   help="unfused attention softmax (local layers; fused only where apex's kernels are installed)")
    g.add_argument("--no-bias-swiglu-fusion", dest="bias_swiglu_fusion", action="store_false",
                   help="unfused SwiGLU (fused on GPU by default)")
    g.add_argument("--no-rope-fusion", dest="apply_rope_fusion", action="store_false",
                   help="unfused RoPE (fused on GPU when Transformer Engine is installed)")
    g.add_argument("--no-gradient-accumulation-fusion", dest="gradient_accumulation_fusion", action="store_false",
                   help="weight gradients through autograd instead of straight into the fp32 main grads "
                        "(fused on GPU with Transformer Engine layers, or apex)")

    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warmup iterations")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine",
                   help="decay after warmup")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="Adam beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip")

    g = p.add_argument_group("parallel")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="PP size: stages split the looped block's layers; the loop goes around the ring T times")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="shard activations along the sequence over TP ranks (needs TP > 1)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state (and fp32 master weights) over data-parallel ranks")
    g.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction, default=True,
                   help="reduce each gradient bucket during the backward pass, as soon as it is complete (default on)")
    g.add_argument("--overlap-param-gather", action=argparse.BooleanOptionalAction, default=None,
                   help="with --use-distributed-optimizer: all-gather the updated weights during the next "
                        "forward pass (default: on with the distributed optimizer, except --rl-algo looprpt)")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="parameters per gradient bucket (default: megatron-core's, max(4e7, 1e6 x DP))")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="prefix, prefixes, or a blend: w1 prefix1 w2 prefix2 ...")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions of the documents")
    g.add_argument("--mock-data", action="store_true",
                   help="synthetic data (megatron's MockGPTDataset) instead of --data-path")
    g.add_argument("--tokenizer-type", choices=["SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer"],
                   default=None,
                   help="default: SentencePieceTokenizer; with --mock-data and no tokenizer flags, "
                        f"NullTokenizer with --vocab-size {MOCK_VOCAB_SIZE}")
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece .model or tokenizer.json")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="NullTokenizer vocabulary; with a real tokenizer, the model vocabulary when larger "
                        "than the tokenizer's (a converted checkpoint's; adopted from --load when not given)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x TP (Megatron's rule)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="data-loader worker processes per rank (default: 2 on a GPU, 0 on the CPU)")

    g = p.add_argument_group("checkpoint")
    g.add_argument("--save", default=None, help="checkpoint directory to write (atomically: temp name, then rename)")
    g.add_argument("--load", default=None, help="checkpoint directory to resume from (any TP/PP layout)")
    g.add_argument("--save-interval", type=int, default=None,
                   help="iterations between checkpoints (a final one is always written)")
    g.add_argument("--ckpt-keep", type=int, default=None, help="keep the newest N checkpoints (default: all)")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in a background process while training continues "
                        "(megatron-core's async save; published atomically once complete)")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="fail when --load has no checkpoint instead of starting from scratch")
    g.add_argument("--no-load-optim", action="store_true", help="do not restore optimizer and scheduler state")
    g.add_argument("--no-load-rng", action="store_true", help="do not restore RNG state")
    g.add_argument("--finetune", action="store_true", help="load weights only, restart iteration count")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10, help="iterations between console lines")
    g.add_argument("--eval-interval", type=int, default=0, help="iterations between validation passes (0: none)")
    g.add_argument("--eval-iters", type=int, default=10, help="global batches per validation pass")
    g.add_argument("--log-json", default=None, help="one JSON object per iteration")
    g.add_argument("--tensorboard-dir", default=None, help="TensorBoard event directory (when tensorboard is installed)")
    g.add_argument("--wandb-project", default=None, help="wandb project (offline unless WANDB_MODE says otherwise)")
    g.add_argument("--wandb-exp-name", default=None, help="wandb run name")
    g.add_argument("--wandb-save-dir", default=None, help="wandb directory")
    g.add_argument("--no-progress-bar", action="store_true", help="no progress bar even on a terminal")

    g = p.add_argument_group("rl")
    g.add_argument("--rl-algo", choices=["none", "looprpt", "grpo", "rltt", "rpt"], default="none",
                   help="looprpt: reinforcement pre-training on the loop steps; grpo / rltt: token-level RL "
                        "with verifiable rewards on --prompt-data; rpt: next-token reasoning on --data-path; "
                        "none: plain pre-training")
    g.add_argument("--rl-hard-token-ratio", type=float, default=0.2,
                   help="fraction of each sequence's tokens (highest teacher entropy) the RL terms use")
    g.add_argument("--rl-num-rollouts", type=int, default=8, help="G noisy latent rollouts per token")
    g.add_argument("--rl-reference-threshold", type=float, default=0.5,
                   help="CDF level of the teacher's exit distribution that defines the reference step t_ref "
                        "(the authors' gate threshold; --exit-threshold is Q-exit's)")
    g.add_argument("--rl-pg-rollout-reduction", choices=["sum", "mean"], default="sum",
                   help="how the policy loss combines the G rollouts of a token (sum: the authors' "
                        "per-step-noise trainer; mean: the one their launch script runs)")
    g.add_argument("--rl-pg-gate-only", action="store_true",
                   help="the policy gradient trains the exit gate only (rollouts see detached latents); "
                        "by default it also flows through the noisy latents into the backbone")
    g.add_argument("--rl-latent-noise-std", type=float, default=0.1,
                   help="std of the Gaussian latent noise (drop probability for dropout)")
    g.add_argument("--rl-noise-type", choices=["gaussian", "dropout"], default="gaussian",
                   help="how latents are perturbed")
    g.add_argument("--rl-reward-scale", type=float, default=1.0, help="multiplies the step-wise reward")
    g.add_argument("--rl-time-penalty", type=float, default=0.02, help="lam_base (the authors' default)")
    g.add_argument("--rl-time-penalty-scale", type=float, default=0.5, help="lam_scale (the authors' default)")
    g.add_argument("--rl-ema-decay", type=float, default=0.995,
                   help="teacher = decay * teacher + (1 - decay) * student after each step")
    g.add_argument("--rl-pg-coef", type=float, default=1.0, help="weight of the policy-gradient term")
    g.add_argument("--rl-model-coef", type=float, default=1.0, help="weight of the advantage-weighted backbone CE")
    g.add_argument("--rl-entropy-coef", type=float, default=0.01, help="weight of the exit-distribution entropy bonus")
    g.add_argument("--rl-kl-coef", type=float, default=0.001, help="weight of the k3 KL to the teacher")

    g = p.add_argument_group("token-level rl (grpo, rltt, rpt)")
    g.add_argument("--prompt-data", default=None,
                   help='JSONL of {"problem", "answer"} (default: a generated arithmetic/word-problem set)')
    g.add_argument("--num-generated-prompts", type=int, default=10000,
                   help="size of the generated default prompt set")
    g.add_argument("--grpo-num-samples", type=int, default=4,
                   help="G answers per prompt; --global-batch-size counts answers (prompts x G)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="longest sampled answer")
    g.add_argument("--sampling-temperature", type=float, default=1.0, help="temperature of the rollouts")
    g.add_argument("--sampling-top-p", type=float, default=1.0, help="nucleus of the rollouts")
    g.add_argument("--grpo-clip-eps", type=float, default=0.2,
                   help="ratio clip of the surrogate (acts from the second of --grpo-epochs updates on)")
    g.add_argument("--grpo-epochs", type=int, default=1,
                   help="optimizer steps on each batch of rollouts (PPO epochs), at the iteration's learning rate")
    g.add_argument("--grpo-kl-coef", type=float, default=0.01, help="weight of the k3 KL to the frozen reference")
    g.add_argument("--answer-verifier", choices=["builtin", "math-verify"], default="builtin",
                   help="grpo / rltt: how a final answer is judged: builtin (dependency-free) or Hugging Face's "
                        "math-verify (pip install -e .[rl])")
    g.add_argument("--rltt-weights", default=None,
                   help="RLTT's loop-step weights of the log-probability: uniform (default), progressive or w1,...,wT")
    g.add_argument("--rpt-horizon", type=int, default=4,
                   help="RPT: tokens of true continuation a predicted next text is judged against")
    g.add_argument("--rpt-min-context", type=int, default=16, help="RPT: tokens of context before a chosen position")
    g.add_argument("--rpt-instruction", default=None,
                   help="RPT: text after the context asking for the prediction (default: reason, then give the "
                        "next words in \\boxed{}; '' for the bare text)")
    return p


# Flags whose presence means "the user gives the shape" (the quickstart preset is not applied).
_ARCHITECTURE = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size")
# What a shape given by hand must contain; the rest have defaults.
_REQUIRED_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "seq_length")
# Defaults of the preset-able flags when no preset is used (ModelShape's own defaults).
_SHAPE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelShape)
                   if f.default is not dataclasses.MISSING and f.name != "vocab_size"}


def resolve_tokenizer(args: argparse.Namespace) -> bool:
    """--tokenizer-type when not given: synthetic data needs no tokenizer file, so a --mock-data
    run that names no tokenizer uses the null tokenizer; everything else defaults to
    SentencePiece. True when the null tokenizer was chosen here (its vocabulary is then the
    preset's, else MOCK_VOCAB_SIZE, unless --vocab-size gives one)."""
    if args.tokenizer_type is not None:
        return False
    implied = args.mock_data and args.tokenizer_model is None
    args.tokenizer_type = "NullTokenizer" if implied else "SentencePieceTokenizer"
    return implied


def apply_preset(args: argparse.Namespace) -> None:
    """Fill the shape flags the user did not give: from --model-size, else from the defaults."""
    if args.model_size is None and all(getattr(args, name) is None for name in _ARCHITECTURE):
        args.model_size = "tiny"
    if args.model_size is not None:
        for name, value in dataclasses.asdict(PRESETS[args.model_size]).items():
            if name == "vocab_size":
                # A preset's vocabulary only sizes NullTokenizer runs; a real tokenizer decides.
                if args.vocab_size is None and args.tokenizer_type == "NullTokenizer":
                    args.vocab_size = value
            elif getattr(args, name) is None:
                setattr(args, name, value)
    for name, value in _SHAPE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    if args.ffn_hidden_size is None and args.hidden_size is not None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Check everything that can be checked before building anything; fill derived values
    (data_parallel_size, global_batch_size, num_microbatches, lr_decay_iters, transformer_impl,
    params_dtype). padded_vocab_size is the caller's: it needs the tokenizer."""
    _validate_shape(args)
    _validate_parallel(args, world_size)
    _validate_optimizer(args)
    _validate_precision(args)
    _validate_rl(args)
    _validate_data(args)
    _validate_checkpoint(args)
    _validate_logging(args)


def _validate_shape(args) -> None:
    for name in _REQUIRED_SHAPE:
        _require(getattr(args, name) is not None,
                 f"{_flag(name)} is required when the shape is given by flags (or choose a --model-size preset)")
    for name in (*_REQUIRED_SHAPE, "num_query_groups", "ffn_hidden_size", "max_position_embeddings", "loop_steps"):
        value = getattr(args, name)
        _require(value >= 1, f"{_flag(name)} must be >= 1, got {value}")
    _require(args.num_attention_heads % args.num_query_groups == 0,
             f"--num-attention-heads {args.num_attention_heads} is not divisible by --num-query-groups "
             f"{args.num_query_groups}: each query group serves a whole number of heads")
    _require(args.hidden_size % args.num_attention_heads == 0,
             f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
             f"{args.num_attention_heads}: choose a width that is a multiple of the head count")
    _require(args.seq_length <= args.max_position_embeddings,
             f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
             f"{args.max_position_embeddings}: raise --max-position-embeddings or shorten --seq-length")
    for name in ("attention_dropout", "hidden_dropout"):
        value = getattr(args, name)
        _require(0.0 <= value < 1.0, f"{_flag(name)} {value} must be in [0, 1)")
    _require(0.0 < args.exit_threshold <= 1.0,
             f"--exit-threshold {args.exit_threshold} must be in (0, 1] (a CDF level of the exit distribution)")
    _require(args.exit_entropy_coef >= 0.0, f"--exit-entropy-coef {args.exit_entropy_coef} must be >= 0")


def _validate_parallel(args, world_size: int) -> None:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size"):
        _require(getattr(args, name) >= 1, f"{_flag(name)} must be >= 1, got {getattr(args, name)}")
    _require(args.num_attention_heads % tp == 0,
             f"--num-attention-heads {args.num_attention_heads} is not divisible by "
             f"--tensor-model-parallel-size {tp}: choose a TP size that divides the head count")
    _require(args.num_query_groups % tp == 0,
             f"--num-query-groups {args.num_query_groups} is not divisible by "
             f"--tensor-model-parallel-size {tp}: choose a TP size that divides the query groups")
    _require(args.num_layers % pp == 0,
             f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}: "
             "each stage holds num_layers/PP layers of the looped block")
    _require(world_size % (tp * pp) == 0,
             f"the world size {world_size} is not divisible by --tensor-model-parallel-size x "
             f"--pipeline-model-parallel-size = {tp * pp}: launch a multiple of {tp * pp} processes")
    _require(not args.sequence_parallel or tp > 1,
             "--sequence-parallel needs --tensor-model-parallel-size > 1 (it splits the sequence over TP ranks)")
    if args.sequence_parallel:
        _require(args.seq_length % tp == 0,
                 f"--seq-length {args.seq_length} is not divisible by --tensor-model-parallel-size {tp} "
                 "(needed by --sequence-parallel)")

    if args.overlap_param_gather is None:
        # LoopRPT's EMA update reads every student weight right after the optimizer step,
        # before a forward pass would have gathered them
        args.overlap_param_gather = args.use_distributed_optimizer and args.rl_algo != "looprpt"
    elif args.overlap_param_gather:
        _require(args.use_distributed_optimizer,
                 "--overlap-param-gather needs --use-distributed-optimizer (without it every rank "
                 "updates all of its weights and there is nothing to gather)")
        _require(args.rl_algo != "looprpt",
                 "--overlap-param-gather: --rl-algo looprpt's EMA update reads the weights right after "
                 "each step, before the next forward pass gathers them; use --no-overlap-param-gather")
    _require(args.ddp_bucket_size is None or args.ddp_bucket_size >= 1,
             f"--ddp-bucket-size must be >= 1, got {args.ddp_bucket_size}")

    dp = world_size // (tp * pp)
    args.data_parallel_size = dp
    per_microbatch_round = args.micro_batch_size * dp
    if args.global_batch_size is None:
        args.global_batch_size = per_microbatch_round
    _require(args.global_batch_size >= 1 and args.global_batch_size % per_microbatch_round == 0,
             f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
             f"{args.micro_batch_size} x data-parallel size {dp}: use a multiple of {per_microbatch_round}")
    args.num_microbatches = args.global_batch_size // per_microbatch_round
    if pp > 1 and args.loop_steps > 1:
        # The loop steps are virtual pipeline stages; megatron-core's interleaved schedule runs
        # micro-batches in groups of PP and refuses a partial group.
        _require(args.num_microbatches % pp == 0,
                 f"--global-batch-size {args.global_batch_size} gives {args.num_microbatches} micro-batches "
                 f"per step, but the looped pipeline needs a multiple of --pipeline-model-parallel-size {pp}: "
                 f"use a global batch that is a multiple of {per_microbatch_round * pp}")


def _validate_optimizer(args) -> None:
    _require(args.train_iters >= 1, f"--train-iters must be >= 1, got {args.train_iters}")
    _require(0.0 <= args.min_lr <= args.lr,
             f"--min-lr {args.min_lr} must be in [0, --lr {args.lr}]: the decay ends at --min-lr")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    _require(0 <= args.lr_warmup_iters <= args.lr_decay_iters,
             f"--lr-warmup-iters {args.lr_warmup_iters} must be in [0, --lr-decay-iters {args.lr_decay_iters}]")
    for name in ("adam_beta1", "adam_beta2"):
        _require(0.0 <= getattr(args, name) < 1.0, f"{_flag(name)} {getattr(args, name)} must be in [0, 1)")


def _validate_precision(args) -> None:
    if args.transformer_impl is None:
        args.transformer_impl = "transformer_engine" if _te_available() else "local"
    if args.fp8_format is not None:
        _require(args.transformer_impl == "transformer_engine",
                 "--fp8-format needs --transformer-impl transformer_engine (FP8 GEMMs are Transformer Engine's)")
        _require(args.bf16, "--fp8-format needs --bf16 (FP8 GEMMs with bf16 everywhere else)")
    if args.transformer_impl == "transformer_engine":
        _require(_te_available(), "--transformer-impl transformer_engine: Transformer Engine is not installed "
                                  "(pip install -e .[gpu]), or pass --transformer-impl local")
    _validate_fp8_recipe(args)
    args.params_dtype = "bfloat16" if args.bf16 else "float32"


def _validate_fp8_recipe(args) -> None:
    given = [name for name in FP8_RECIPE_FLAGS if getattr(args, name) is not None]
    if args.fp8_format is None:
        if given:
            raise ConfigError(f"{_flag(given[0])} applies to FP8 training: add --fp8-format or drop it")
        return
    if args.fp8_recipe is None:
        args.fp8_recipe = "delayed"
    if args.fp8_recipe != "delayed":
        for name in _DELAYED_SCALING:
            _require(name not in given,
                     f"{_flag(name)} applies to --fp8-recipe delayed, not {args.fp8_recipe}: drop it")
    else:
        for name, default in _DELAYED_SCALING.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
        _require(args.fp8_margin >= 0, f"--fp8-margin must be >= 0, got {args.fp8_margin}")
        _require(args.fp8_amax_history_len >= 1,
                 f"--fp8-amax-history-len must be >= 1, got {args.fp8_amax_history_len}")
    needed, installed = FP8_RECIPE_MIN_TE[args.fp8_recipe], _te_version()
    _require(installed is None or installed >= needed,
             f"--fp8-recipe {args.fp8_recipe} needs Transformer Engine >= {'.'.join(map(str, needed))}, "
             f"installed {'.'.join(map(str, installed or ()))}: upgrade it or use --fp8-recipe delayed")


def _validate_rl(args) -> None:
    # The RL flags mean nothing without their --rl-algo, so only then are they checked.
    if args.rl_algo in ("grpo", "rltt", "rpt"):
        _validate_token_rl(args)
    if args.rl_algo != "looprpt":
        return
    _require(0.0 < args.rl_hard_token_ratio <= 1.0,
             f"--rl-hard-token-ratio {args.rl_hard_token_ratio} must be in (0, 1]")
    _require(args.rl_num_rollouts >= 2,
             f"--rl-num-rollouts {args.rl_num_rollouts} must be >= 2: the advantage is relative to the group")
    _require(0.0 < args.rl_reference_threshold <= 1.0,
             f"--rl-reference-threshold {args.rl_reference_threshold} must be in (0, 1] (a CDF level of the "
             "teacher's exit distribution)")
    _require(0.0 <= args.rl_ema_decay < 1.0,
             f"--rl-ema-decay {args.rl_ema_decay} must be in [0, 1) (1 would freeze the teacher)")
    _require(args.rl_latent_noise_std >= 0.0, f"--rl-latent-noise-std {args.rl_latent_noise_std} must be >= 0")
    if args.rl_noise_type == "dropout":
        _require(args.rl_latent_noise_std < 1.0,
                 "--rl-latent-noise-std is the drop probability with --rl-noise-type dropout: use < 1")


def _validate_token_rl(args) -> None:
    g = args.grpo_num_samples
    _require(g >= 2, f"--grpo-num-samples {g} must be >= 2: the advantage is relative to the group")
    answers_per_rank = args.global_batch_size // args.data_parallel_size
    _require(answers_per_rank % g == 0,
             f"--global-batch-size {args.global_batch_size} gives {answers_per_rank} answers per data-parallel "
             f"rank, not a multiple of --grpo-num-samples {g}: each rank samples whole groups")
    _require(1 <= args.max_new_tokens < args.seq_length,
             f"--max-new-tokens {args.max_new_tokens} must be in [1, --seq-length {args.seq_length})")
    _require(args.sampling_temperature > 0, f"--sampling-temperature {args.sampling_temperature} must be > 0")
    _require(0.0 < args.sampling_top_p <= 1.0, f"--sampling-top-p {args.sampling_top_p} must be in (0, 1]")
    _require(args.tokenizer_type != "NullTokenizer",
             f"--rl-algo {args.rl_algo} samples text answers: give a real --tokenizer-type")
    _require(not args.sequence_parallel, f"--rl-algo {args.rl_algo} generates one position at a time: "
                                         "drop --sequence-parallel")
    _require(args.grpo_epochs >= 1, f"--grpo-epochs {args.grpo_epochs} must be >= 1")
    _require(args.rltt_weights is None or args.rl_algo == "rltt",
             f"--rltt-weights applies to --rl-algo rltt (--rl-algo {args.rl_algo} reads the last loop step)")
    _require(args.rpt_instruction is None or args.rl_algo == "rpt", "--rpt-instruction applies to --rl-algo rpt")
    _require(args.answer_verifier == "builtin" or args.rl_algo != "rpt",
             "--answer-verifier applies to --rl-algo grpo and rltt (rpt rewards a predicted continuation)")
    if args.answer_verifier == "math-verify":
        _require(importlib.util.find_spec("math_verify") is not None,
                 "--answer-verifier math-verify: the math-verify package is not installed "
                 "(pip install -e .[rl], or use --answer-verifier builtin)")
    if args.rl_algo == "rpt":
        _require(args.rpt_horizon >= 1 and args.rpt_min_context >= 1 and
                 args.rpt_min_context + args.rpt_horizon < args.seq_length,
                 f"--rpt-min-context {args.rpt_min_context} + --rpt-horizon {args.rpt_horizon} must be "
                 f"positive and fit in --seq-length {args.seq_length}")
    elif args.prompt_data is not None:
        _require(os.path.isfile(args.prompt_data), f"--prompt-data {args.prompt_data} does not exist")
    else:
        _require(args.num_generated_prompts >= 1, "--num-generated-prompts must be >= 1")
    if args.rl_algo == "rltt":
        from megatron_looprpt.rl.grpo import step_weights

        try:
            step_weights(args.rltt_weights or "uniform", args.loop_steps)
        except ValueError as error:
            raise ConfigError(f"--rltt-weights: {error}") from None


def _validate_data(args) -> None:
    if args.tokenizer_type == "NullTokenizer":
        _require(args.vocab_size is not None and args.vocab_size >= 2,
                 "--tokenizer-type NullTokenizer needs --vocab-size >= 2")
    else:
        _require(args.tokenizer_model is not None,
                 f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model (a .model or tokenizer.json)")
        _require(os.path.isfile(args.tokenizer_model),
                 f"--tokenizer-model {args.tokenizer_model} does not exist "
                 "(train one with tools/train_tokenizer.py)")
    _require(args.num_workers is None or args.num_workers >= 0,
             f"--num-workers must be >= 0, got {args.num_workers}")
    _require(args.make_vocab_size_divisible_by >= 1,
             f"--make-vocab-size-divisible-by must be >= 1, got {args.make_vocab_size_divisible_by}")
    _validate_split(args.split)
    if args.mock_data or args.rl_algo in ("grpo", "rltt"):  # token-level RL reads --prompt-data
        return
    _require(bool(args.data_path), "--data-path is required (or pass --mock-data for synthetic data)")
    for prefix in _data_prefixes(args.data_path):
        for suffix in (".bin", ".idx"):
            _require(os.path.isfile(prefix + suffix),
                     f"--data-path: {prefix + suffix} does not exist (write it with tools/preprocess_data.py)")


def _validate_split(split: str) -> None:
    usage = f"--split {split}: give up to three non-negative train,valid,test proportions, e.g. 969,30,1"
    try:
        parts = [float(part) for part in split.split(",")]
    except ValueError:
        raise ConfigError(usage) from None
    _require(len(parts) <= 3 and min(parts) >= 0 and sum(parts) > 0, usage)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _data_prefixes(data_path: List[str]) -> List[str]:
    """The prefixes of a Megatron blend list: one prefix, several prefixes, or weight/prefix pairs.
    Parsed here rather than by megatron-core so that validation imports nothing heavy."""
    numeric = [_is_number(item) for item in data_path]
    if len(data_path) == 1 or not any(numeric):
        return list(data_path)
    pairs = len(data_path) % 2 == 0 and all(numeric[0::2]) and not any(numeric[1::2])
    _require(pairs, f"--data-path {' '.join(data_path)}: give one prefix, several prefixes, or "
                    "alternating weight prefix pairs (e.g. 0.7 a_text_document 0.3 b_text_document)")
    weights = [float(w) for w in data_path[0::2]]
    _require(min(weights) >= 0 and sum(weights) > 0,
             f"--data-path weights {' '.join(data_path[0::2])} must be non-negative with a positive sum")
    return data_path[1::2]


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _validate_checkpoint(args) -> None:
    if args.load:
        # Megatron semantics: a missing --load directory means "start from scratch" unless
        # --exit-on-missing-checkpoint asks for a hard failure.
        if os.path.exists(args.load):
            _require(os.path.isdir(args.load), f"--load {args.load} is not a directory")
        else:
            _require(not args.exit_on_missing_checkpoint,
                     f"--load {args.load} does not exist (drop --exit-on-missing-checkpoint to start from scratch)")
    if args.save:
        # The save directory is created on the first save, so its nearest existing ancestor
        # must be a writable directory.
        existing = _nearest_existing(args.save)
        _require(os.path.isdir(existing) and os.access(existing, os.W_OK),
                 f"--save {args.save}: {existing} is not a writable directory")
    for name in ("save_interval", "ckpt_keep"):
        value = getattr(args, name)
        _require(value is None or value >= 1, f"{_flag(name)} must be >= 1, got {value}")
    _require(not args.async_save or args.save, "--async-save needs --save (the directory to write to)")


def _validate_logging(args) -> None:
    _require(args.log_interval >= 1, f"--log-interval must be >= 1, got {args.log_interval}")
    for name in ("eval_interval", "eval_iters"):
        _require(getattr(args, name) >= 0, f"{_flag(name)} must be >= 0, got {getattr(args, name)}")


# The fields that fix the shape of the weights. Not --loop-steps: the weights do not depend on T,
# so a checkpoint may be loaded with another loop count.
# what a --load checkpoint fixes: the shape, and what the weights were trained to expect (RoPE's
# base and the norms' epsilon change every activation without changing a shape)
_CHECKPOINT_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "untie_embeddings_and_output_weights", "rotary_base", "norm_epsilon",
                     "exit_gate_init")
# what a checkpoint written before a flag existed was trained with
_CHECKPOINT_DEFAULTS = {"exit_gate_init": "geometric"}


def check_checkpoint_shape(args: argparse.Namespace, saved_args: dict) -> None:
    """Refuse a --load checkpoint of another shape before anything is built. ``saved_args``: the
    arguments stored with the checkpoint. The vocabulary is compared once the caller has set
    ``args.padded_vocab_size`` (it needs the tokenizer)."""
    saved_args = {**_CHECKPOINT_DEFAULTS, **saved_args}
    mismatches = [
        f"{_flag(name)} {getattr(args, name)} but the checkpoint has {saved_args[name]}"
        for name in _CHECKPOINT_SHAPE
        if name in saved_args and saved_args[name] != getattr(args, name)
    ]
    if saved_args["exit_gate_init"] == "uniform" and saved_args.get("loop_steps", args.loop_steps) != args.loop_steps:
        mismatches.append(f"--loop-steps {args.loop_steps} but the checkpoint's gate has a bias for each of its "
                          f"{saved_args['loop_steps']} steps (--exit-gate-init uniform)")
    ours, theirs = getattr(args, "padded_vocab_size", None), saved_args.get("padded_vocab_size")
    if ours is not None and theirs is not None and ours != theirs:
        mismatches.append(f"padded vocabulary {ours} (from the tokenizer or --vocab-size) "
                          f"but the checkpoint has {theirs}")
    _require(not mismatches, f"--load {args.load}: the checkpoint at {args.load} has another model shape: "
                             + "; ".join(mismatches) + " (give the checkpoint's shape flags or --model-size)")


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    """Parse ``argv`` (default: sys.argv[1:]), apply the preset, validate and fill derived values.
    ``world_size`` defaults to $WORLD_SIZE (set by torchrun), else 1."""
    args = build_parser().parse_args(argv)
    implied_null_tokenizer = resolve_tokenizer(args)
    apply_preset(args)
    if implied_null_tokenizer and args.vocab_size is None:
        args.vocab_size = MOCK_VOCAB_SIZE
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate_args(args, world_size)
    return args
