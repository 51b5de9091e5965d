"""Command-line arguments of pretrain_looprpt.py: presets and validation (the flags themselves are
``megatron_looprpt.flags``').

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

from megatron_looprpt.flags import FP8_RECIPE_MIN_TE, MOCK_VOCAB_SIZE, build_parser
from megatron_looprpt.presets import PRESETS, ModelShape


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
    _require(args.step_increase_penalty >= 0.0,
             f"--step-increase-penalty {args.step_increase_penalty} must be >= 0")
    if args.step_loss_weights != "exit":
        _require_step_weights("--step-loss-weights", args.step_loss_weights, args.loop_steps,
                              " (or exit, Ouro's loss)")


def _require_step_weights(flag: str, kind: str, loop_steps: int, alternatives: str = "") -> None:
    from megatron_looprpt.models.step_weights import step_weights

    try:
        step_weights(kind, loop_steps)
    except ValueError as error:
        raise ConfigError(f"{flag}: {error}{alternatives}") from None


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

    token_rl = args.rl_algo in ("grpo", "rltt", "rpt")
    if args.overlap_grad_reduce is None:
        args.overlap_grad_reduce = not token_rl
    _require(not (token_rl and args.overlap_grad_reduce),
             f"--overlap-grad-reduce cannot be used with --rl-algo {args.rl_algo}: its loss gives the exit gate "
             "no gradient, and megatron-core's overlapped reduction waits for one from every parameter "
             "(drop the flag or pass --no-overlap-grad-reduce)")
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
        _require_step_weights("--rltt-weights", args.rltt_weights or "uniform", args.loop_steps)


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
                     "exit_gate_init", "loop_step_embedding", "loop_input_injection", "loop_carry")
# what a checkpoint written before a flag existed was trained with: Ouro's architecture, also what a
# model converted from Hugging Face Ouro has
CHECKPOINT_DEFAULTS = {"exit_gate_init": "geometric", "loop_step_embedding": False,
                        "loop_input_injection": False, "loop_carry": "normed"}
# Settings that add weights held once per loop step (additions of ours, not Ouro's): with them a
# checkpoint's T is part of its shape, and Ouro's format has no place for the weights.
# field -> (the value that adds them, its flag, one of the weights, the weights)
_PER_STEP_WEIGHTS = {
    "exit_gate_init": ("uniform", "--exit-gate-init uniform", "an exit-gate bias", "exit-gate biases"),
    "loop_step_embedding": (True, "--loop-step-embedding", "an input embedding", "input embeddings"),
}


# Settings that change what the looped block computes without adding weights (ours, not Ouro's):
# Ouro's modeling code would run such a checkpoint's weights as another function.
# field -> (the value that sets it, its flag, what it makes the model do)
_DATAFLOW_CHANGES = {
    "loop_input_injection": (True, "--loop-input-injection", "re-reads the token embedding at every loop step"),
    "loop_carry": ("residual", "--loop-carry residual", "carries the un-normalised state between loop steps"),
}


def checkpoint_settings(saved_args: dict) -> dict:
    """A checkpoint's saved arguments, with what one saved before a setting existed was trained
    with (CHECKPOINT_DEFAULTS) where the setting is missing."""
    return {**CHECKPOINT_DEFAULTS, **saved_args}


def _settings_in_effect(saved_args: dict, table: dict) -> list:
    """The entries (less the value) of ``table`` whose setting the checkpoint arguments have."""
    saved_args = checkpoint_settings(saved_args)
    return [entry[1:] for name, entry in table.items() if saved_args[name] == entry[0]]


def dataflow_changes(saved_args: dict) -> list:
    """(flag, what it does) of each setting the checkpoint arguments say changes the looped
    block's computation from Ouro's; empty for a model in Ouro's architecture."""
    return _settings_in_effect(saved_args, _DATAFLOW_CHANGES)


def per_step_weights(saved_args: dict) -> list:
    """(flag, one weight, the weights) of each per-step weight the checkpoint arguments say the
    model holds; empty for a model in Ouro's architecture."""
    return _settings_in_effect(saved_args, _PER_STEP_WEIGHTS)


def check_checkpoint_shape(args: argparse.Namespace, saved_args: dict) -> None:
    """Refuse a --load checkpoint of another shape before anything is built. ``saved_args``: the
    arguments stored with the checkpoint. The vocabulary is compared once the caller has set
    ``args.padded_vocab_size`` (it needs the tokenizer)."""
    saved_args = checkpoint_settings(saved_args)
    mismatches = [
        f"{_flag(name)} {getattr(args, name)} but the checkpoint has {saved_args[name]}"
        for name in _CHECKPOINT_SHAPE
        if name in saved_args and saved_args[name] != getattr(args, name)
    ]
    saved_steps = saved_args.get("loop_steps", args.loop_steps)
    if saved_steps != args.loop_steps:
        mismatches += [f"--loop-steps {args.loop_steps} but the checkpoint has {one} for each of its "
                       f"{saved_steps} steps ({flag})" for flag, one, _ in per_step_weights(saved_args)]
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
