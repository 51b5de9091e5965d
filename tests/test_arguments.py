"""Argument presets and validation: every bad input is one line naming the flag, before any
model is built."""

import os
import subprocess
import sys

import pytest

from megatron_looprpt.arguments import ConfigError, check_checkpoint_shape, parse_args
from megatron_looprpt.presets import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512"]


def error_of(argv, world_size=1):
    with pytest.raises(ConfigError) as info:
        parse_args(argv, world_size=world_size)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_presets_fill_shape_and_explicit_flags_win():
    args = parse_args(["--model-size", "small", "--hidden-size", "240", "--num-attention-heads", "6", *MOCK])
    assert args.hidden_size == 240 and args.num_layers == PRESETS["small"].num_layers
    args = parse_args(MOCK)
    assert args.model_size == "tiny" and args.loop_steps == 4


def test_ouro_presets_have_the_published_shapes():
    for name, layers in (("ouro-1.4b", 24), ("ouro-2.6b", 48)):
        shape = PRESETS[name]
        assert (shape.num_layers, shape.hidden_size, shape.num_attention_heads, shape.num_query_groups,
                shape.ffn_hidden_size, shape.vocab_size, shape.loop_steps, shape.rotary_base) == \
            (layers, 2048, 16, 16, 5632, 49152, 4, 1000000)


def test_derived_values():
    args = parse_args(["--micro-batch-size", "2", "--global-batch-size", "16", *MOCK], world_size=4)
    assert args.data_parallel_size == 4 and args.num_microbatches == 2
    assert args.lr_decay_iters == args.train_iters


@pytest.mark.parametrize("argv, world, flag", [
    (["--num-attention-heads", "6", "--num-query-groups", "6", "--hidden-size", "192",
      "--tensor-model-parallel-size", "4"], 4, "--num-attention-heads"),
    (["--num-query-groups", "1", "--tensor-model-parallel-size", "2"], 2, "--num-query-groups"),
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], 2, "--num-layers"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "--global-batch-size"),
    (["--global-batch-size", "4", "--micro-batch-size", "2"], 4, "--global-batch-size"),
    (["--tensor-model-parallel-size", "2"], 3, "--tensor-model-parallel-size"),
    (["--hidden-size", "130"], 1, "--hidden-size"),
    (["--seq-length", "1024", "--max-position-embeddings", "512"], 1, "--seq-length"),
    (["--sequence-parallel"], 1, "--sequence-parallel"),
    (["--exit-threshold", "1.5"], 1, "--exit-threshold"),
    (["--lr", "1e-5", "--min-lr", "1e-4"], 1, "--min-lr"),
    (["--fp8-format", "hybrid", "--transformer-impl", "local"], 1, "--fp8-format"),
    (["--rl-algo", "looprpt", "--rl-num-rollouts", "1"], 1, "--rl-num-rollouts"),
    (["--rl-algo", "looprpt", "--rl-hard-token-ratio", "0"], 1, "--rl-hard-token-ratio"),
    (["--rl-algo", "looprpt", "--rl-ema-decay", "1.0"], 1, "--rl-ema-decay"),
    (["--pipeline-model-parallel-size", "2", "--global-batch-size", "4", "--micro-batch-size", "4"],
     2, "micro-batches"),
])
def test_inconsistent_arguments(argv, world, flag):
    assert flag in error_of(["--model-size", "tiny", *argv, *MOCK], world_size=world)


def test_partial_shape_without_preset_names_the_missing_flag():
    assert "--hidden-size is required" in error_of(["--num-layers", "2", *MOCK])


def test_transformer_engine_missing_names_the_extra():
    pytest.importorskip  # TE is not installed on CPU machines
    try:
        import transformer_engine  # noqa: F401
        pytest.skip("Transformer Engine is installed")
    except ImportError:
        pass
    assert "pip install -e .[gpu]" in error_of(["--transformer-impl", "transformer_engine", *MOCK])


def test_missing_files(tmp_path):
    message = error_of(["--data-path", str(tmp_path / "nothing"), "--tokenizer-type", "NullTokenizer",
                        "--vocab-size", "512"])
    assert "--data-path" in message and "nothing" in message
    message = error_of(["--mock-data", "--tokenizer-model", str(tmp_path / "tok.model")])
    assert "--tokenizer-model" in message
    message = error_of(["--tokenizer-type", "NullTokenizer", "--vocab-size", "512"])
    assert "--data-path" in message and "--mock-data" in message
    message = error_of([*MOCK, "--load", str(tmp_path / "none"), "--exit-on-missing-checkpoint"])
    assert "--load" in message


def test_checkpoint_of_another_shape_is_refused():
    args = parse_args(MOCK)
    saved = {"num_layers": args.num_layers, "hidden_size": 256, "num_attention_heads": args.num_attention_heads,
             "num_query_groups": args.num_query_groups, "ffn_hidden_size": args.ffn_hidden_size,
             "loop_steps": 8, "untie_embeddings_and_output_weights": True}
    args.load = "/ckpt"
    with pytest.raises(ConfigError) as info:
        check_checkpoint_shape(args, saved)
    assert "--hidden-size 128 but the checkpoint has 256" in str(info.value)
    # The loop count is not part of the shape: the weights do not depend on T.
    saved["hidden_size"] = args.hidden_size
    check_checkpoint_shape(args, saved)


def test_cli_reports_one_line_and_exit_code_2_before_building():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "pretrain_looprpt.py"), "--model-size", "tiny", "--num-layers", "3",
         "--pipeline-model-parallel-size", "2", *MOCK],
        capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "2"}, timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "--num-layers 3" in lines[0] and "--pipeline-model-parallel-size 2" in lines[0]
    assert "looped model:" not in result.stdout
