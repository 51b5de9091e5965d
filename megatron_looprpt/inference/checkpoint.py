"""A trained (or converted) checkpoint, built and loaded for inference under a chosen layout."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Optional

from megatron_looprpt import parallel
from megatron_looprpt.arguments import FP8_RECIPE_FLAGS, ConfigError, validate_args
from megatron_looprpt.data.tokenizers import Tokenizer, build_tokenizer, model_vocab_size
from megatron_looprpt.training import checkpointing
from megatron_looprpt.training.loop import model_config
from megatron_looprpt.training.saved_run import check_vocab_padding, read_saved_run, saved_model_args
from megatron_looprpt.models.builder import build_model


@dataclass
class InferenceModel:
    pm: object                 # PipelinedModel, loaded, this rank's shard
    tokenizer: Tokenizer
    vocab_size: int            # unpadded: sampling never returns a padding id
    args: argparse.Namespace   # the checkpoint's run arguments under this layout
    iteration: int


def load_for_inference(load_dir: str, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                       tokenizer_model: Optional[str] = None) -> InferenceModel:
    """Read ``load_dir``'s saved arguments, start the process groups of the layout (torchrun's
    env:// or one process) and load the model. Raises ConfigError (one line, naming the flag)
    for a missing checkpoint or tokenizer, or a layout the world size cannot hold."""
    info = read_saved_run("--load", load_dir)
    args = saved_model_args(info["args"])
    # the training-only settings become ones every layout accepts (generation batches itself)
    args.update(load=None, save=None, mock_data=True, sequence_parallel=False,
                micro_batch_size=1, global_batch_size=pipeline_parallel,
                tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel)
    # Decoding feeds batch x 1 tokens, which FP8 GEMMs refuse (Transformer Engine asserts token
    # counts in multiples of 8/16): an FP8-trained model's bf16 weights run with bf16 GEMMs.
    args.update(fp8_format=None, **{name: None for name in FP8_RECIPE_FLAGS})
    if tokenizer_model is not None:
        args["tokenizer_model"] = tokenizer_model
    args = argparse.Namespace(**args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        validate_args(args, world)
    except ConfigError as error:
        raise ConfigError(f"--load {load_dir}: {error}") from None
    # inference holds no optimizer state, so no data-parallel replicas are needed or wanted
    if world != tensor_parallel * pipeline_parallel:
        raise ConfigError(f"--tensor-model-parallel-size {tensor_parallel} x --pipeline-model-parallel-size "
                          f"{pipeline_parallel} must equal the number of processes ({world})")
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    vocab_size = model_vocab_size(tokenizer, args.vocab_size)
    cfg = model_config(args, vocab_size)
    check_vocab_padding("--load", load_dir, info["args"], cfg.padded_vocab_size, tensor_parallel)
    parallel.initialize(tensor_parallel, pipeline_parallel, args.seed)
    pm = build_model(cfg, seed=args.seed, wrap_ddp=False)
    loaded = checkpointing.load_checkpoint(info["path"], pm, None, None, load_optim=False, load_rng=False)
    return InferenceModel(pm=pm, tokenizer=tokenizer, vocab_size=vocab_size, args=args,
                          iteration=loaded.iteration)
