"""The Ouro architecture as both checkpoint formats describe it.

Hugging Face: ``config.json`` of an ``OuroForCausalLM`` (fields of Ouro's ``OuroConfig``).
megatron_looprpt: the run arguments saved in the checkpoint (``--num-layers`` ...). This module
is the one place that maps one onto the other, and says what our model cannot represent.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from megatron_looprpt.models.builder import pad_vocab_size


class ConversionError(ValueError):
    """A checkpoint that cannot be converted as asked; the message is one line."""


_ARCHITECTURE = "OuroForCausalLM"
_MODEL_TYPE = "ouro"
# What Ouro's published checkpoints map with trust_remote_code (their code ships beside the
# weights; we carry those files, never write them).
_AUTO_MAP = {
    "AutoConfig": "configuration_ouro.OuroConfig",
    "AutoModel": "modeling_ouro.OuroModel",
    "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM",
}


@dataclass
class OuroArchitecture:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    loop_steps: int = 4
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    early_exit_threshold: float = 1.0
    initializer_range: float = 0.02
    torch_dtype: str = "float32"
    # The source config.json, so that a round trip restores fields this class does not model
    # (token ids, generation settings, auto_map, ...).
    hf_config: Dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # -- Hugging Face ---------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Dict[str, Any], path: str) -> "OuroArchitecture":
        archs = config.get("architectures") or []
        if config.get("model_type") != _MODEL_TYPE and _ARCHITECTURE not in archs:
            raise ConversionError(
                f"{path}: unknown architecture (model_type {config.get('model_type')!r}, "
                f"architectures {archs}); only Ouro ({_ARCHITECTURE}, model_type 'ouro') converts")
        missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                               "intermediate_size", "vocab_size") if k not in config]
        if missing:
            raise ConversionError(f"{path}: config.json lacks {', '.join(missing)}")
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        unsupported = []
        if head_dim * heads != config["hidden_size"]:
            unsupported.append(f"head_dim {head_dim} x {heads} heads != hidden_size {config['hidden_size']}")
        if config.get("rope_scaling"):
            unsupported.append(f"rope_scaling {config['rope_scaling']}")
        if config.get("use_sliding_window"):
            unsupported.append("use_sliding_window true")
        if config.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act {config['hidden_act']}")
        if unsupported:
            raise ConversionError(f"{path}: our looped model cannot represent " + "; ".join(unsupported))
        return cls(
            num_layers=config["num_hidden_layers"],
            hidden_size=config["hidden_size"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            max_position_embeddings=config.get("max_position_embeddings", 32768),
            loop_steps=config.get("total_ut_steps", 4),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            early_exit_threshold=config.get("early_exit_threshold", 1.0),
            initializer_range=config.get("initializer_range", 0.02),
            # transformers < 4.56 writes torch_dtype, later versions dtype
            torch_dtype=config.get("torch_dtype") or config.get("dtype") or "float32",
            hf_config=copy.deepcopy(config),
        )

    def to_hf_config(self, torch_dtype: str) -> Dict[str, Any]:
        """config.json: the source's fields, with every field our model fixes written over them."""
        config = copy.deepcopy(self.hf_config)
        config.setdefault("auto_map", dict(_AUTO_MAP))
        config.update(
            architectures=[_ARCHITECTURE],
            model_type=_MODEL_TYPE,
            num_hidden_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            total_ut_steps=self.loop_steps,
            early_exit_threshold=self.early_exit_threshold,
            rope_theta=self.rope_theta,
            rope_scaling=None,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            attention_dropout=config.get("attention_dropout", 0.0),
            initializer_range=self.initializer_range,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=config.get("max_window_layers", self.num_layers),
            layer_types=["full_attention"] * self.num_layers,
            use_cache=config.get("use_cache", True),
            torch_dtype=torch_dtype,
        )
        # transformers >= 4.56 reads "dtype" before "torch_dtype": a source config that has it must
        # not keep the source's value beside the export's
        if "dtype" in config:
            config["dtype"] = torch_dtype
        return config

    # -- megatron_looprpt run arguments -------------------------------------------------------
    @classmethod
    def from_checkpoint_args(cls, args: Dict[str, Any], vocab_size: int) -> "OuroArchitecture":
        heads = args["num_attention_heads"]
        return cls(
            num_layers=args["num_layers"],
            hidden_size=args["hidden_size"],
            num_attention_heads=heads,
            num_key_value_heads=args.get("num_query_groups") or heads,
            intermediate_size=args.get("ffn_hidden_size") or 4 * args["hidden_size"],
            vocab_size=vocab_size,
            max_position_embeddings=args["max_position_embeddings"],
            loop_steps=args.get("loop_steps", 4),
            rope_theta=float(args.get("rotary_base", 10000)),
            rms_norm_eps=args.get("norm_epsilon", 1e-6),
            tie_word_embeddings=not args.get("untie_embeddings_and_output_weights", True),
            early_exit_threshold=_exit_threshold(args),
            initializer_range=args.get("init_method_std", 0.02),
            torch_dtype="bfloat16" if args.get("bf16") else "float32",
            hf_config=copy.deepcopy(args.get("hf_config") or {}),
        )

    def checkpoint_args(self, tensor_parallel: int, pipeline_parallel: int, divisible_by: int,
                        tokenizer_json: Optional[str], bf16: bool,
                        source_args: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The run arguments a converted checkpoint carries: enough for ``--load``,
        ``tools/evaluate.py`` and the way back to Hugging Face. ``source_args``: a megatron
        source's own (its tokenizer, sequence length, ... stay as they were)."""
        from megatron_looprpt.arguments import CHECKPOINT_DEFAULTS
        from megatron_looprpt.flags import build_parser

        if source_args:
            args = copy.deepcopy(source_args)
        else:
            # a Hugging Face Ouro model: Ouro's architecture, not the parser's unfilled preset flags
            args = {**vars(build_parser().parse_args([])), **CHECKPOINT_DEFAULTS}
        args.update(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_key_value_heads,
            ffn_hidden_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            seq_length=min(args["seq_length"] or 4096, self.max_position_embeddings),
            loop_steps=self.loop_steps,
            exit_threshold=self.early_exit_threshold,
            rotary_base=self.rope_theta,
            norm_epsilon=self.rms_norm_eps,
            untie_embeddings_and_output_weights=not self.tie_word_embeddings,
            init_method_std=self.initializer_range,
            vocab_size=self.vocab_size,
            padded_vocab_size=pad_vocab_size(self.vocab_size, divisible_by, tensor_parallel),
            make_vocab_size_divisible_by=divisible_by,
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            bf16=bf16,
            hf_config=self.hf_config,
        )
        if tokenizer_json is not None:
            args.update(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer_json)
        return args

    def check_layout(self, tensor_parallel: int, pipeline_parallel: int, where: str) -> None:
        """The shape must split evenly over the target layout (megatron shards heads, query
        groups and the MLP over TP, and the layers over PP)."""
        if tensor_parallel < 1 or pipeline_parallel < 1:
            raise ConversionError(f"{where}: parallel sizes must be >= 1")
        for name, value in (("num_attention_heads", self.num_attention_heads),
                            ("num_key_value_heads", self.num_key_value_heads),
                            ("intermediate_size", self.intermediate_size)):
            if value % tensor_parallel:
                raise ConversionError(
                    f"--target-tensor-parallel-size {tensor_parallel}: {name} {value} does not "
                    f"split into {tensor_parallel} parts (choose a TP size that divides it)")
        if self.num_layers % pipeline_parallel:
            raise ConversionError(
                f"--target-pipeline-model-parallel-size {pipeline_parallel}: {self.num_layers} "
                f"layers do not split into {pipeline_parallel} stages (choose a divisor)")


def _exit_threshold(args: Dict[str, Any]) -> Optional[float]:
    """Ouro's early_exit_threshold is an inference default: a checkpoint that came from Hugging
    Face keeps its source's, whatever --exit-threshold its later training ran with; a model
    trained here exports the threshold it trained with."""
    hf_config = args.get("hf_config") or {}
    if "early_exit_threshold" in hf_config:
        return hf_config["early_exit_threshold"]
    threshold = args.get("exit_threshold")
    return 1.0 if threshold is None else threshold
