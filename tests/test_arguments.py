"""Arguments: presets fill the shape, explicit flags win, and every bad input is one line naming
the flag, before any model is built (nothing heavy is imported)."""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest

from megatron_looprpt.arguments import ConfigError, build_parser, check_checkpoint_shape, parse_args
from megatron_looprpt.presets import PRESETS, ModelShape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TE_INSTALLED = importlib.util.find_spec("transformer_engine") is not None
MOCK = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512"]


def error_of(argv, world_size=1):
    with pytest.raises(ConfigError) as info:
        parse_args(argv, world_size=world_size)
    message = str(info.value)
    assert "\n" not in message
    return message


def shape_of(args):
    return ModelShape(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ModelShape)})


# ---------------------------------------------------------------------------------------------
# Presets


def test_no_shape_flags_means_tiny():
    args = parse_args(MOCK)
    assert args.model_size == "tiny"
    assert shape_of(args) == dataclasses.replace(PRESETS["tiny"], vocab_size=512)


def test_presets_fill_shape_and_explicit_flags_win():
    args = parse_args(["--model-size", "small", "--hidden-size", "240", "--num-attention-heads", "6",
                       "--loop-steps", "2", "--rotary-base", "500000", "--tie-embeddings-and-output-weights",
                       *MOCK])
    small = PRESETS["small"]
    assert (args.hidden_size, args.num_attention_heads, args.loop_steps, args.rotary_base) == (240, 6, 2, 500000)
    assert args.untie_embeddings_and_output_weights is False
    assert (args.num_layers, args.num_query_groups, args.ffn_hidden_size, args.seq_length) == \
        (small.num_layers, small.num_query_groups, small.ffn_hidden_size, small.seq_length)


def test_every_preset_is_consistent_and_cpu_presets_grow():
    for name in PRESETS:
        args = parse_args(["--model-size", name, *MOCK])
        assert args.model_size == name
    cpu = [PRESETS[name] for name in ("tiny", "small", "medium", "base")]
    assert PRESETS["tiny"] == ModelShape(2, 128, 4, 2, 352, 128, 512, loop_steps=4, loop_input_injection=True)
    for smaller, larger in zip(cpu, cpu[1:]):
        assert larger.hidden_size > smaller.hidden_size and larger.num_layers >= smaller.num_layers


def test_input_injection_is_the_cpu_presets_recipe_and_off_for_ouro_shapes():
    # the CPU presets train the stage-1 recipe; Ouro's shapes and hand-given shapes are Ouro's
    # architecture, so that what they train exports to Hugging Face Ouro
    assert all(parse_args(["--model-size", name, *MOCK]).loop_input_injection
               for name in ("tiny", "small", "medium", "base"))
    assert not any(parse_args(["--model-size", name, *MOCK]).loop_input_injection
                   for name in ("ouro-1.4b", "ouro-2.6b"))
    assert parse_args(MOCK).loop_input_injection  # no shape flag at all: the tiny preset
    by_hand = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]
    assert parse_args([*by_hand, *MOCK]).loop_input_injection is False
    assert parse_args(["--model-size", "tiny", "--no-loop-input-injection", *MOCK]).loop_input_injection is False
    assert parse_args([*by_hand, "--loop-input-injection", *MOCK]).loop_input_injection is True


def test_ouro_presets_have_the_published_shapes():
    for name, layers in (("ouro-1.4b", 24), ("ouro-2.6b", 48)):
        shape = PRESETS[name]
        assert (shape.num_layers, shape.hidden_size, shape.num_attention_heads, shape.num_query_groups,
                shape.ffn_hidden_size, shape.max_position_embeddings, shape.vocab_size, shape.loop_steps,
                shape.rotary_base, shape.untie_embeddings_and_output_weights) == \
            (layers, 2048, 16, 16, 5632, 65536, 49152, 4, 1000000, True)
        # The preset's vocabulary sizes NullTokenizer runs; a real tokenizer brings its own.
        assert parse_args(["--model-size", name, "--mock-data", "--tokenizer-type", "NullTokenizer"]).vocab_size == 49152


def test_shape_by_hand_without_preset():
    args = parse_args(["--num-layers", "3", "--hidden-size", "96", "--num-attention-heads", "4",
                       "--seq-length", "64", *MOCK])
    assert args.model_size is None
    assert (args.num_query_groups, args.ffn_hidden_size, args.max_position_embeddings) == (4, 384, 64)
    assert (args.loop_steps, args.rotary_base, args.untie_embeddings_and_output_weights) == (4, 10000, True)


@pytest.mark.parametrize("argv, missing", [
    (["--num-layers", "2"], "--hidden-size"),
    (["--num-attention-heads", "8"], "--num-layers"),
    (["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"], "--seq-length"),
])
def test_partial_shape_without_preset_names_the_missing_flag(argv, missing):
    message = error_of([*argv, *MOCK])
    assert f"{missing} is required" in message and "--model-size" in message


# ---------------------------------------------------------------------------------------------
# Derived values and a full configuration


def test_derived_values():
    args = parse_args(["--micro-batch-size", "2", "--global-batch-size", "16", "--train-iters", "50", *MOCK],
                      world_size=4)
    assert (args.data_parallel_size, args.num_microbatches, args.lr_decay_iters) == (4, 2, 50)
    assert args.params_dtype == "float32"
    assert args.transformer_impl == ("transformer_engine" if TE_INSTALLED else "local")
    args = parse_args(["--micro-batch-size", "2", *MOCK], world_size=4)
    assert (args.global_batch_size, args.num_microbatches) == (8, 1)


def test_world_size_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_args(MOCK).data_parallel_size == 2


def test_full_valid_configuration(tmp_path):
    for name in ("a_text_document", "b_text_document"):
        for suffix in (".bin", ".idx"):
            (tmp_path / (name + suffix)).write_bytes(b"")
    (tmp_path / "tok.model").write_bytes(b"")
    (tmp_path / "ckpt").mkdir()
    args = parse_args([
        "--model-size", "medium", "--num-layers", "4", "--seq-length", "256", "--max-position-embeddings", "1024",
        "--micro-batch-size", "2", "--global-batch-size", "32", "--train-iters", "1000",
        "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "100", "--lr-decay-iters", "900",
        "--lr-decay-style", "linear", "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.98",
        "--adam-eps", "1e-6", "--clip-grad", "0.5", "--init-method-std", "0.01", "--seed", "7",
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
        "--use-distributed-optimizer", "--bf16", "--transformer-impl", "local",
        "--data-path", "0.7", str(tmp_path / "a_text_document"), "0.3", str(tmp_path / "b_text_document"),
        "--split", "98,2,0", "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
        str(tmp_path / "tok.model"), "--make-vocab-size-divisible-by", "64",
        "--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt"), "--save-interval", "100",
        "--ckpt-keep", "2", "--async-save", "--exit-on-missing-checkpoint", "--no-load-optim", "--no-load-rng", "--finetune",
        "--eval-interval", "100", "--eval-iters", "5", "--log-interval", "1", "--log-json", str(tmp_path / "l.jsonl"),
        "--tensorboard-dir", str(tmp_path / "tb"), "--wandb-project", "p", "--wandb-exp-name", "e",
        "--wandb-save-dir", str(tmp_path / "wandb"), "--no-progress-bar",
        "--loop-steps", "3", "--exit-entropy-coef", "0.1", "--exit-threshold", "0.5",
        "--exit-gate-training", "stage2", "--rotary-base", "1000000", "--norm-epsilon", "1e-5",
        "--attention-dropout", "0.1", "--hidden-dropout", "0.1",
        "--rl-algo", "looprpt", "--rl-hard-token-ratio", "0.3", "--rl-num-rollouts", "4",
        "--rl-latent-noise-std", "0.2", "--rl-noise-type", "dropout", "--rl-reward-scale", "2",
        "--rl-time-penalty", "0.02", "--rl-time-penalty-scale", "0.5", "--rl-ema-decay", "0.99",
        "--rl-pg-coef", "0.5", "--rl-model-coef", "0.5", "--rl-entropy-coef", "0.02", "--rl-kl-coef", "0.1",
        "--rl-reference-threshold", "0.7", "--rl-pg-rollout-reduction", "mean", "--rl-pg-gate-only",
    ], world_size=8)
    assert (args.num_layers, args.hidden_size, args.loop_steps, args.data_parallel_size, args.num_microbatches) == \
        (4, 256, 3, 2, 8)
    assert args.params_dtype == "bfloat16" and args.lr_decay_iters == 900
    assert args.data_path == ["0.7", str(tmp_path / "a_text_document"), "0.3", str(tmp_path / "b_text_document")]
    assert (args.rl_algo, args.rl_num_rollouts, args.rl_noise_type, args.exit_gate_training) == \
        ("looprpt", 4, "dropout", "stage2")
    assert (args.rl_reference_threshold, args.rl_pg_rollout_reduction, args.rl_pg_gate_only, args.exit_threshold) == \
        (0.7, "mean", True, 0.5)


def test_defaults_follow_megatron_and_the_brief():
    args = build_parser().parse_args([])
    assert (args.split, args.make_vocab_size_divisible_by, args.norm_epsilon, args.attention_dropout,
            args.hidden_dropout, args.ckpt_keep, args.data_path) == ("969,30,1", 128, 1e-6, 0.0, 0.0, None, None)
    assert (args.exit_entropy_coef, args.exit_threshold, args.exit_gate_training, args.rl_algo) == \
        (0.05, 0.9, "stage1", "none")
    assert (args.rl_hard_token_ratio, args.rl_num_rollouts, args.rl_latent_noise_std, args.rl_reward_scale,
            args.rl_time_penalty, args.rl_time_penalty_scale, args.rl_ema_decay, args.rl_pg_coef,
            args.rl_model_coef, args.rl_entropy_coef, args.rl_kl_coef) == \
        (0.2, 8, 0.1, 1.0, 0.02, 0.5, 0.995, 1.0, 1.0, 0.01, 0.001)
    # the authors' LoopRPT: t_ref at their gate threshold, the rollouts summed, the policy
    # gradient into the backbone (docs/looprpt.md)
    assert (args.rl_reference_threshold, args.rl_pg_rollout_reduction, args.rl_pg_gate_only) == (0.5, "sum", False)
    titles = {group.title for group in build_parser()._action_groups}
    assert {"model", "loop", "training", "optimizer", "parallel", "data", "checkpoint", "logging", "rl"} <= titles


def test_missing_load_directory_starts_from_scratch(tmp_path):
    args = parse_args([*MOCK, "--load", str(tmp_path / "none"), "--save", str(tmp_path / "new" / "ckpt")])
    assert args.load == str(tmp_path / "none")


# ---------------------------------------------------------------------------------------------
# Validation: one line naming the flag


@pytest.mark.parametrize("argv, world, flag", [
    # model shape
    (["--num-attention-heads", "6", "--num-query-groups", "6", "--hidden-size", "192",
      "--tensor-model-parallel-size", "4"], 4, "--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"),
    (["--num-query-groups", "1", "--tensor-model-parallel-size", "2"], 2, "--num-query-groups 1 is not divisible"),
    (["--num-query-groups", "3"], 1, "--num-query-groups 3"),
    (["--hidden-size", "130"], 1, "--hidden-size 130 is not divisible by --num-attention-heads"),
    (["--hidden-size", "0"], 1, "--hidden-size must be >= 1"),
    (["--ffn-hidden-size", "0"], 1, "--ffn-hidden-size must be >= 1"),
    (["--seq-length", "1024", "--max-position-embeddings", "512"], 1, "--seq-length 1024 exceeds --max-position-embeddings 512"),
    (["--hidden-dropout", "1.0"], 1, "--hidden-dropout"),
    # loop
    (["--loop-steps", "0"], 1, "--loop-steps must be >= 1"),
    (["--exit-threshold", "1.5"], 1, "--exit-threshold"),
    (["--exit-threshold", "0"], 1, "--exit-threshold"),
    # parallel layout and batch
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], 2, "--num-layers 3 is not divisible by --pipeline-model-parallel-size 2"),
    (["--tensor-model-parallel-size", "2"], 3, "--tensor-model-parallel-size"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "--global-batch-size 6"),
    (["--global-batch-size", "4", "--micro-batch-size", "2"], 4, "--global-batch-size 4"),
    (["--sequence-parallel"], 1, "--sequence-parallel"),
    (["--pipeline-model-parallel-size", "2", "--global-batch-size", "4", "--micro-batch-size", "4"],
     2, "micro-batches"),
    (["--pipeline-model-parallel-size", "2", "--global-batch-size", "3", "--micro-batch-size", "1"],
     2, "--pipeline-model-parallel-size 2"),
    # optimizer
    (["--lr", "1e-5", "--min-lr", "1e-4"], 1, "--min-lr"),
    (["--lr-warmup-iters", "200", "--train-iters", "100"], 1, "--lr-warmup-iters 200"),
    (["--lr-warmup-iters", "50", "--lr-decay-iters", "20"], 1, "--lr-decay-iters 20"),
    # precision
    (["--fp8-format", "hybrid", "--transformer-impl", "local"], 1, "--fp8-format needs --transformer-impl"),
    (["--fp8-format", "e4m3", "--transformer-impl", "transformer_engine"], 1, "--fp8-format needs --bf16"),
    # LoopRPT
    (["--rl-algo", "looprpt", "--rl-num-rollouts", "1"], 1, "--rl-num-rollouts"),
    (["--rl-algo", "looprpt", "--rl-hard-token-ratio", "0"], 1, "--rl-hard-token-ratio"),
    (["--rl-algo", "looprpt", "--rl-hard-token-ratio", "1.5"], 1, "--rl-hard-token-ratio"),
    (["--rl-algo", "looprpt", "--rl-ema-decay", "1.0"], 1, "--rl-ema-decay"),
    (["--rl-algo", "looprpt", "--rl-ema-decay", "-0.1"], 1, "--rl-ema-decay"),
    (["--rl-algo", "looprpt", "--rl-reference-threshold", "0"], 1, "--rl-reference-threshold"),
    (["--rl-algo", "looprpt", "--rl-reference-threshold", "1.2"], 1, "--rl-reference-threshold"),
    (["--rl-algo", "looprpt", "--rl-noise-type", "dropout", "--rl-latent-noise-std", "1"], 1,
     "--rl-latent-noise-std"),
    (["--step-loss-weights", "1,2"], 1, "--step-loss-weights: step weights '1,2': give 4 non-negative numbers"),
    (["--step-increase-penalty", "-1"], 1, "--step-increase-penalty -1.0 must be >= 0"),
    (["--step-loss-weights", "late"], 1, "--step-loss-weights: step weights 'late': choose one of"),
    # GRPO / RLTT (MOCK's NullTokenizer is refused on its own; a real tokenizer file below)
    (["--rl-algo", "grpo"], 1, "--rl-algo grpo samples text answers"),
    # data, checkpoint, logging
    (["--split", "90,x,1"], 1, "--split"),
    (["--split", "1,1,1,1"], 1, "--split"),
    (["--ckpt-keep", "0"], 1, "--ckpt-keep"),
    (["--save-interval", "0"], 1, "--save-interval"),
    (["--async-save"], 1, "--async-save needs --save"),
    (["--log-interval", "0"], 1, "--log-interval"),
])
def test_inconsistent_arguments(argv, world, flag):
    assert flag in error_of(["--model-size", "tiny", *argv, *MOCK], world_size=world)


def test_overlapped_grad_reduce_is_off_by_default_only_for_token_level_rl(tmp_path):
    # megatron-core's overlapped reduction waits for a gradient from every parameter; token-level
    # RL's loss gives the exit gate none
    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(b"")  # only its existence is checked here
    assert parse_args(["--model-size", "tiny", *MOCK], world_size=1).overlap_grad_reduce
    assert parse_args(["--model-size", "tiny", "--rl-algo", "looprpt", *MOCK], world_size=1).overlap_grad_reduce
    assert not parse_args(["--model-size", "tiny", "--rl-algo", "rpt", "--mock-data", "--tokenizer-type",
                           "SentencePieceTokenizer", "--tokenizer-model", str(tokenizer)], world_size=1).overlap_grad_reduce


def test_layouts_that_divide_everything_pass():
    args = parse_args(["--model-size", "ouro-2.6b", "--tensor-model-parallel-size", "2",
                       "--pipeline-model-parallel-size", "8", "--sequence-parallel", "--micro-batch-size", "1",
                       "--global-batch-size", "1024", *MOCK], world_size=64)
    assert (args.data_parallel_size, args.num_microbatches) == (4, 256)


@pytest.mark.parametrize("argv, world, flag", [
    (["--grpo-num-samples", "1"], 1, "--grpo-num-samples 1 must be >= 2"),
    (["--grpo-num-samples", "3", "--global-batch-size", "8"], 1, "not a multiple of --grpo-num-samples 3"),
    (["--global-batch-size", "8", "--micro-batch-size", "1"], 4, "gives 2 answers per data-parallel rank"),
    (["--max-new-tokens", "128", "--seq-length", "128"], 1, "--max-new-tokens 128"),
    (["--sampling-top-p", "0"], 1, "--sampling-top-p"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "2"], 2, "drop --sequence-parallel"),
    (["--prompt-data", "/nonexistent.jsonl"], 1, "--prompt-data /nonexistent.jsonl does not exist"),
    (["--rl-algo", "rltt", "--rltt-weights", "1,2"], 1, "--rltt-weights: step weights '1,2'"),
    (["--rl-algo", "rpt", "--overlap-grad-reduce"], 1, "--overlap-grad-reduce cannot be used with --rl-algo rpt"),
    (["--rl-algo", "rpt", "--rpt-min-context", "125", "--seq-length", "128", "--max-new-tokens", "8"], 1,
     "--rpt-min-context 125 + --rpt-horizon 4 must be"),
])
def test_token_level_rl_arguments(tmp_path, argv, world, flag):
    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(b"")  # only its existence is checked here
    argv = ["--rl-algo", "grpo", *argv] if "--rl-algo" not in argv else argv
    assert flag in error_of(["--model-size", "tiny", "--tokenizer-type", "SentencePieceTokenizer",
                             "--tokenizer-model", str(tokenizer), *argv], world_size=world)


def test_rl_flags_are_checked_only_with_looprpt():
    parse_args(["--rl-num-rollouts", "1", "--rl-ema-decay", "1.0", *MOCK])


def test_transformer_engine_missing_names_the_extra():
    if TE_INSTALLED:
        pytest.skip("Transformer Engine is installed")
    assert "pip install -e .[gpu]" in error_of(["--transformer-impl", "transformer_engine", *MOCK])


def test_data_and_tokenizer_files(tmp_path):
    null = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "512"]
    message = error_of(["--data-path", str(tmp_path / "nothing"), *null])
    assert "--data-path" in message and str(tmp_path / "nothing.bin") in message
    (tmp_path / "half.bin").write_bytes(b"")
    message = error_of(["--data-path", "1", str(tmp_path / "half"), *null])
    assert "--data-path" in message and str(tmp_path / "half.idx") in message
    (tmp_path / "half.idx").write_bytes(b"")
    assert parse_args(["--data-path", "1", str(tmp_path / "half"), *null]).data_path == ["1", str(tmp_path / "half")]
    assert parse_args(["--data-path", str(tmp_path / "half"), str(tmp_path / "half"), *null])
    for blend in (["0.5", str(tmp_path / "half"), "0.5"], ["0.5", "0.5"], [str(tmp_path / "half"), "0.5"]):
        assert "--data-path" in error_of(["--data-path", *blend, *null])
    assert "--data-path weights" in error_of(["--data-path", "-1", str(tmp_path / "half"), "2",
                                              str(tmp_path / "half"), *null])
    message = error_of(["--tokenizer-type", "NullTokenizer", "--vocab-size", "512"])
    assert "--data-path is required" in message and "--mock-data" in message
    message = error_of(["--mock-data", "--tokenizer-model", str(tmp_path / "tok.model")])
    assert "--tokenizer-model" in message and "tok.model" in message
    assert "--tokenizer-model" in error_of(["--mock-data", "--tokenizer-type", "HuggingFaceTokenizer"])
    assert "--vocab-size" in error_of(["--mock-data", "--tokenizer-type", "NullTokenizer"])


def test_checkpoint_directories(tmp_path):
    message = error_of([*MOCK, "--load", str(tmp_path / "none"), "--exit-on-missing-checkpoint"])
    assert "--load" in message and "--exit-on-missing-checkpoint" in message
    (tmp_path / "file").write_text("")
    assert "--load" in error_of([*MOCK, "--load", str(tmp_path / "file")])
    assert "--save" in error_of([*MOCK, "--save", str(tmp_path / "file" / "ckpt")])


def test_checkpoint_of_another_shape_is_refused():
    args = parse_args(MOCK)
    args.load, args.padded_vocab_size = "/ckpt", 512
    saved = {name: getattr(args, name) for name in (
        "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
        "untie_embeddings_and_output_weights", "padded_vocab_size", "loop_input_injection")}
    # The loop count is not part of the shape: the weights do not depend on T.
    check_checkpoint_shape(args, {**saved, "loop_steps": 8})
    with pytest.raises(ConfigError) as info:
        check_checkpoint_shape(args, {**saved, "hidden_size": 256, "untie_embeddings_and_output_weights": False})
    message = str(info.value)
    assert "\n" not in message and message.startswith("--load /ckpt")
    assert "--hidden-size 128 but the checkpoint has 256" in message
    assert "--untie-embeddings-and-output-weights True but the checkpoint has False" in message
    with pytest.raises(ConfigError, match="padded vocabulary 512 .* has 1024"):
        check_checkpoint_shape(args, {**saved, "padded_vocab_size": 1024})
    # a checkpoint from before --loop-step-embedding existed was trained without it
    with pytest.raises(ConfigError, match="--loop-step-embedding True but the checkpoint has False"):
        check_checkpoint_shape(parse_args(MOCK + ["--loop-step-embedding"]), saved)
    # with it, the weights have one vector per step: T is then part of the shape
    embedded = {**saved, "loop_step_embedding": True}
    check_checkpoint_shape(parse_args(MOCK + ["--loop-step-embedding"]), {**embedded, "loop_steps": 4})
    with pytest.raises(ConfigError, match="--loop-steps 4 but the checkpoint has an input embedding for each of its 8"):
        check_checkpoint_shape(parse_args(MOCK + ["--loop-step-embedding"]), {**embedded, "loop_steps": 8})
    # the loop's dataflow adds no weights, but weights trained with one compute another function
    # under the other: refused both ways. A checkpoint from before the flags has Ouro's loop, so
    # the tiny preset (input injection on) refuses it and --no-loop-input-injection loads it.
    before_the_flags = {name: value for name, value in saved.items() if name != "loop_input_injection"}
    with pytest.raises(ConfigError, match="--loop-input-injection True but the checkpoint has False"):
        check_checkpoint_shape(args, before_the_flags)
    check_checkpoint_shape(parse_args(MOCK + ["--no-loop-input-injection"]), before_the_flags)
    with pytest.raises(ConfigError, match="--loop-carry residual but the checkpoint has normed"):
        check_checkpoint_shape(parse_args(MOCK + ["--loop-carry", "residual"]), saved)
    # neither adds a weight per step: T stays free
    check_checkpoint_shape(args, {**saved, "loop_steps": 8})


def test_cli_reports_one_line_and_exit_code_2_without_heavy_imports():
    code = ("import sys, pretrain_looprpt; rc = pretrain_looprpt.main(sys.argv[1:]); "
            "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules)); sys.exit(rc)")
    result = subprocess.run(
        [sys.executable, "-c", code, "--model-size", "tiny", "--num-layers", "3",
         "--pipeline-model-parallel-size", "2", *MOCK],
        capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "2"}, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "--num-layers 3" in lines[0] and "--pipeline-model-parallel-size 2" in lines[0]
    assert result.stdout.strip() == "[]"


def test_mock_data_without_tokenizer_flags_uses_the_null_tokenizer():
    from megatron_looprpt.arguments import MOCK_VOCAB_SIZE

    args = parse_args(["--mock-data"])
    assert (args.tokenizer_type, args.vocab_size) == ("NullTokenizer", MOCK_VOCAB_SIZE)
    assert parse_args(["--mock-data", "--vocab-size", "300"]).vocab_size == 300
    assert parse_args(["--mock-data", "--model-size", "ouro-1.4b"]).vocab_size == 49152   # the preset's
    # Megatron's way keeps working, and a run naming a tokenizer file gets no null tokenizer
    assert parse_args(MOCK).vocab_size == 512
    assert "SentencePieceTokenizer needs --tokenizer-model" in error_of(["--data-path", "x"])
