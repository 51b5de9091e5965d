"""Loss and grad norm of 3 optimizer steps are the same under every parallel layout (fp32)."""

import json

import pytest

from tests.test_cli import corpus  # noqa: F401 (the real-text fixture)
from tests.torchrun import run, run_json

LAYOUTS = {
    "tp2": (2, ["--tp", "2"]),
    "tp2_sp": (2, ["--tp", "2", "--sp"]),
    "pp2": (2, ["--pp", "2"]),
    "dp2_distopt": (2, ["--dist-opt"]),
    "tp2_pp2": (4, ["--tp", "2", "--pp", "2"]),
    "tp2_pp2_sp": (4, ["--tp", "2", "--pp", "2", "--sp"]),
}
_reference = {}


def reference(loops, tmp_path_factory):
    if loops not in _reference:
        out = tmp_path_factory.mktemp("ref") / "ref.json"
        _reference[loops] = run_json("tests/harness/layout_run.py", 1, ["--loops", loops], out)
    return _reference[loops]


def assert_close(a, b, rel=1e-5):
    assert abs(a - b) <= rel * max(abs(a), abs(b)), (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("loops", [1, 2, 4])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, loops, tmp_path, tmp_path_factory):
    nproc, flags = LAYOUTS[layout]
    expected = reference(loops, tmp_path_factory)
    got = run_json("tests/harness/layout_run.py", nproc, [*flags, "--loops", loops], tmp_path / "run.json")
    assert len(got) == len(expected) == 3
    for step, (g, e) in enumerate(zip(got, expected)):
        assert_close(g["loss"], e["loss"])
        assert_close(g["grad_norm"], e["grad_norm"])
        for g_ce, e_ce in zip(g["step_ce"], e["step_ce"]):
            assert_close(g_ce, e_ce)
    # The model must actually have trained: the loss moved.
    assert got[0]["loss"] != got[-1]["loss"]


# TP=2 without SP: every TP rank draws the noise of every position (with SP each draws its own part)
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pp2", "tp2_pp2"])
def test_tied_embeddings_across_pipeline_stages_match_single_process(layout, tmp_path, tmp_path_factory):
    # the first stage's embedding and the last stage's output layer are one weight: synced at
    # build (megatron's embedding group, bridged on CPU) and their gradients summed every step
    if "tied" not in _reference:
        out = tmp_path_factory.mktemp("tied") / "ref.json"
        _reference["tied"] = run_json("tests/harness/layout_run.py", 1, ["--tied"], out)
    expected = _reference["tied"]
    nproc, flags = LAYOUTS[layout]
    got = run_json("tests/harness/layout_run.py", nproc, [*flags, "--tied"], tmp_path / "run.json")
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected):
        assert_close(g["loss"], e["loss"])
        assert_close(g["grad_norm"], e["grad_norm"])
    assert got[0]["loss"] != got[-1]["loss"]


@pytest.mark.slow
def test_loop_step_embedding_matches_single_process(tmp_path, tmp_path_factory):
    # the per-step input vectors live on the first stage and see a slice of the sequence per TP
    # rank under SP, so TP x PP x SP is where their gradient could go wrong
    expected = run_json("tests/harness/layout_run.py", 1, ["--loops", 4, "--loop-step-embedding"],
                        tmp_path_factory.mktemp("stepemb") / "ref.json")
    nproc, flags = LAYOUTS["tp2_pp2_sp"]
    got = run_json("tests/harness/layout_run.py", nproc, [*flags, "--loops", 4, "--loop-step-embedding"],
                   tmp_path / "run.json")
    without = reference(4, tmp_path_factory)
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected):
        assert_close(g["loss"], e["loss"])
        assert_close(g["grad_norm"], e["grad_norm"])
    # zero at the start, the vectors are the only difference from Ouro's model: the first step's
    # loss is that model's, and once the optimizer has moved them the losses part
    assert_close(expected[0]["loss"], without[0]["loss"])
    assert expected[-1]["loss"] != without[-1]["loss"]


@pytest.mark.slow
def test_input_injection_and_residual_carry_match_single_process(tmp_path, tmp_path_factory):
    # the injected embedding is recomputed by the first stage for every loop step it runs, and
    # the carried residual leaves the last stage while the head reads its normalised twin, whose
    # gradient must come back through the final norm: TP x PP x SP is where either could go wrong
    options = ["--loops", 4, "--loop-input-injection", "--loop-carry", "residual"]
    expected = run_json("tests/harness/layout_run.py", 1, options, tmp_path_factory.mktemp("inject") / "ref.json")
    nproc, flags = LAYOUTS["tp2_pp2_sp"]
    got = run_json("tests/harness/layout_run.py", nproc, [*flags, *options], tmp_path / "run.json")
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected):
        assert_close(g["loss"], e["loss"])
        assert_close(g["grad_norm"], e["grad_norm"])
    # the same weights as Ouro's model, computing another function from the first step on
    assert expected[0]["loss"] != reference(4, tmp_path_factory)[0]["loss"]


RL_LAYOUTS = {k: LAYOUTS[k] for k in ("tp2", "tp2_sp", "pp2", "dp2_distopt", "tp2_pp2_sp")}
_rl_reference = {}
# The policy-gradient term is a sum of +-advantage * log-prob that nearly cancels; its
# round-off is judged against the size of the terms, not against the tiny sum.
_ABSOLUTE = {"pg_loss": 1e-6, "reward_mean": 1e-7}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(RL_LAYOUTS))
def test_looprpt_layout_matches_single_process(layout, tmp_path, tmp_path_factory):
    if "ref" not in _rl_reference:
        out = tmp_path_factory.mktemp("rlref") / "ref.json"
        _rl_reference["ref"] = run_json("tests/harness/layout_run.py", 1, ["--rl"], out)
    expected = _rl_reference["ref"]
    nproc, flags = RL_LAYOUTS[layout]
    got = run_json("tests/harness/layout_run.py", nproc, [*flags, "--rl"], tmp_path / "run.json")
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected):
        for key, value in e.items():
            for gv, ev in zip(g[key] if isinstance(value, list) else [g[key]],
                              value if isinstance(value, list) else [value]):
                if key in _ABSOLUTE:
                    assert abs(gv - ev) <= _ABSOLUTE[key] + 1e-5 * abs(ev), (key, gv, ev)
                else:
                    assert_close(gv, ev)
    # The teacher moved with the student (EMA) and the KL term became active.
    assert got[0]["teacher_probe"] != got[-1]["teacher_probe"]
    assert got[0]["kl_loss"] == 0.0 and got[-1]["kl_loss"] > 0.0


# Through pretrain_looprpt.py from an untrained model, where the teacher's entropies of a
# sequence tie within round-off: the hard tokens, and so everything after them, must still not
# depend on the layout (docs/looprpt.md, "Hard tokens").
CLI_LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "dp2_distopt": ["--use-distributed-optimizer"],
}
CLI_FIELDS = ("lm_loss", "step_loss", "grad_norm", "reward_mean", "pg_loss", "model_loss", "kl_loss",
              "entropy", "student_exit_step")
# The policy loss sums +-advantage x log-prob over 8 rollouts, terms of order 1 that cancel to
# 0.2-1.3: its fp32 round-off, reduced in another order, is judged against them.
# The reward is the student's log-prob minus the teacher's (each about ln V = 8 nats here) at an
# untrained model, where they cancel to ~3e-4: its round-off is fp32's relative 1e-7 of the
# log-probs, not of the difference (megatron-core 0.19's TP cross entropy reduces in another
# order and moved it by 4e-8).
CLI_ABSOLUTE = {"pg_loss": 1e-5, "reward_mean": 1e-6}
CLI_EXACT = ("hard_token_fraction", "teacher_t_ref", "qexit_steps")
_cli_reference = {}


def _looprpt_cli_run(data, corpus, nproc, layout, log):
    if data == "mock":
        data_flags = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512"]
    else:
        data_flags = ["--data-path", corpus["prefixes"][0], "--split", "90,8,2",
                      "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", corpus["tokenizer"]]
    argv = ["--model-size", "tiny", "--seq-length", "64", "--num-layers", "2", *data_flags,
            "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "2e-3", "--min-lr", "2e-4",
            "--lr-warmup-iters", "1", "--lr-decay-iters", "6", "--train-iters", "3", "--seed", "3",
            "--rl-algo", "looprpt", "--log-interval", "1", "--no-progress-bar", "--log-json", str(log), *layout]
    result = run("pretrain_looprpt.py", nproc, argv)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(log) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.parametrize("data", ["mock", "text"])
@pytest.mark.parametrize("layout", list(CLI_LAYOUTS))
def test_looprpt_cli_from_an_untrained_model_matches_single_process(data, layout, corpus, tmp_path,
                                                                     tmp_path_factory):
    if data not in _cli_reference:
        log = tmp_path_factory.mktemp(f"cli_{data}") / "log.jsonl"
        _cli_reference[data] = _looprpt_cli_run(data, corpus, 1, [], log)
    expected = _cli_reference[data]
    got = _looprpt_cli_run(data, corpus, 2, CLI_LAYOUTS[layout], tmp_path / "log.jsonl")
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected):
        for key in CLI_EXACT:
            assert g[key] == e[key], (g["iteration"], key, g[key], e[key])
        for key in CLI_FIELDS:
            for gv, ev in zip(*(v if isinstance(v, list) else [v] for v in (g[key], e[key]))):
                tolerance = max(1e-5 * max(abs(gv), abs(ev)), CLI_ABSOLUTE.get(key, 0.0))
                assert abs(gv - ev) <= tolerance, (g["iteration"], key, gv, ev)
    assert expected[-1]["kl_loss"] > 0.0 and expected[0]["lm_loss"] != expected[-1]["lm_loss"]
