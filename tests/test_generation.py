"""Sampling from the looped model with a KV cache per loop step."""

import pytest
import torch

from tests.harness.generate_run import PROMPTS, VOCAB, build
from tests.torchrun import run_json


def _generate(model, **kwargs):
    from megatron_looprpt.inference.generation import SamplingConfig, generate

    defaults = dict(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=4)
    return generate(model, PROMPTS, VOCAB, SamplingConfig(**{**defaults, **kwargs}))


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.0), dict(exit_step=0), dict(exit_threshold=0.5)],
                         ids=["last-step", "greedy", "first-step", "q-exit"])
def test_cached_generation_equals_full_recomputation(single_process_parallel, options):
    model = build(1)
    cached = _generate(model, **options)
    recomputed = _generate(model, use_cache=False, **options)
    assert cached.tokens == recomputed.tokens
    assert [len(t) for t in cached.tokens] == [12] * len(PROMPTS)
    for a, b in zip(cached.logprobs, recomputed.logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    assert cached.exit_steps == recomputed.exit_steps
    if "exit_threshold" in options:
        assert len({s for row in cached.exit_steps for s in row}) > 1  # tokens exit at different steps
    else:
        step = options.get("exit_step", 2) + 1
        assert all(s == step for row in cached.exit_steps for s in row)


@pytest.mark.parametrize("loop_options", [dict(loop_input_injection=True), dict(loop_carry="residual")],
                         ids=["input-injection", "residual-carry"])
def test_cached_generation_equals_full_recomputation_for_other_loops(single_process_parallel, loop_options):
    # a decoding step re-embeds only its new tokens for the injection, and carries only theirs
    model = build(1, **loop_options)
    cached, recomputed = _generate(model, temperature=0.0), _generate(model, temperature=0.0, use_cache=False)
    assert cached.tokens == recomputed.tokens
    for a, b in zip(cached.logprobs, recomputed.logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    assert cached.tokens != _generate(build(1), temperature=0.0).tokens  # the loop option is in effect


def test_sampling_settings_and_stop_tokens(single_process_parallel):
    model = build(1)
    first = _generate(model)
    assert _generate(model).tokens == first.tokens                    # same seed, same samples
    assert _generate(model, seed=5).tokens != first.tokens
    stop = first.tokens[0][3]
    stopped = _generate(model, stop_tokens=(stop,))
    for row, full in zip(stopped.tokens, first.tokens):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:cut]
    # nucleus sampling with a tiny top_p keeps only the most likely token: greedy
    assert _generate(model, top_p=1e-6).tokens == _generate(model, temperature=0.0).tokens
    assert all(0 <= t < VOCAB for row in first.tokens for t in row)   # never a padding id


def test_refusals(single_process_parallel):
    from megatron_looprpt.inference.generation import SamplingConfig, generate

    model = build(1)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings 64"):
        generate(model, PROMPTS, VOCAB, SamplingConfig(max_new_tokens=60))
    with pytest.raises(ValueError, match="exit_step must be in"):
        generate(model, PROMPTS, VOCAB, SamplingConfig(exit_step=3))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], VOCAB, SamplingConfig())


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2pp2"])
def test_generation_under_tensor_and_pipeline_parallelism_equals_one_process(tmp_path, tp, pp):
    one = run_json("tests/harness/generate_run.py", 1, ["--tp", 1], tmp_path / "one.json")
    got = run_json("tests/harness/generate_run.py", tp * pp, ["--tp", tp, "--pp", pp], tmp_path / "got.json")
    assert got["recomputed"]["tokens"] == got["fixed"]["tokens"]
    for mode in ("fixed", "q_exit"):
        assert got[mode]["tokens"] == one[mode]["tokens"]
        assert got[mode]["exit_steps"] == one[mode]["exit_steps"]
        for a, b in zip(got[mode]["logprobs"], one[mode]["logprobs"]):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)


def test_temperature_and_nucleus_sampling_on_known_probabilities():
    from megatron_looprpt.inference.generation import SamplingConfig, sample

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, -1)
    generators = [torch.Generator().manual_seed(row) for row in range(4000)]
    counts = torch.bincount(sample(logits, SamplingConfig(top_p=0.7), generators), minlength=4).double()
    # the nucleus of mass >= 0.7 is {0, 1}, renormalised to 5/8 and 3/8
    assert counts[2:].sum() == 0
    assert abs(counts[0] / 4000 - 5 / 8) < 0.03
    counts = torch.bincount(sample(logits, SamplingConfig(temperature=2.0), generators), minlength=4).double()
    expected = probs.sqrt() / probs.sqrt().sum()  # p^(1/T) renormalised
    assert torch.allclose(counts / 4000, expected.double(), atol=0.03)
    assert torch.equal(sample(logits[:3], SamplingConfig(temperature=0.0), generators), torch.zeros(3, dtype=torch.long))


@pytest.mark.slow
def test_generate_tool_on_a_converted_checkpoint_matches_a_plain_pytorch_greedy_decode(tmp_path):
    """tools/generate.py (greedy) on a Hugging Face checkpoint converted for TP=2 gives the
    tokens a plain-PyTorch Ouro forward picks, under TP=2 and TP=2 x PP=2."""
    import json
    import os
    import subprocess
    import sys

    from tests.test_conversion import WORDS, convert_ok, ouro_config, ouro_forward, write_hf
    from tests.torchrun import ROOT, run

    weights = write_hf(tmp_path / "hf", loop_steps=2)
    convert_ok("--source-format", "hf", "--target-format", "mcore", "--load-dir", tmp_path / "hf",
               "--save-dir", tmp_path / "ckpt", "--target-tensor-parallel-size", 2)
    prompts = ["w1 w2 w3", "w40 w7", "w13 w13 w13 w5 w9"]
    ids = {"<pad>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    expected = []
    for prompt in prompts:
        tokens = [ids[w] for w in prompt.split()]
        for _ in range(6):
            logits, _ = ouro_forward(weights, ouro_config(False, 2), torch.tensor([tokens]))
            tokens.append(int(logits[-1, 0, -1].argmax()))
        expected.append(tokens[len(prompt.split()):])
    for nproc, layout in ((2, []), (4, ["--pipeline-model-parallel-size", 2])):
        out = tmp_path / f"samples{nproc}.jsonl"
        result = run("tools/generate.py", nproc, ["--load", tmp_path / "ckpt", "--tensor-model-parallel-size", 2,
                                                  *layout, "--temperature", 0, "--max-new-tokens", 6,
                                                  *[a for p in prompts for a in ("--prompt", p)],
                                                  "--output", out], timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["tokens"] for r in rows] == expected
        assert [r["prompt"] for r in rows] == prompts and all(len(r["logprobs"]) == 6 for r in rows)

    refused = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--load",
                              tmp_path / "ckpt", "--prompt", "w1"], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert refused.returncode == 2
    assert "pads the vocabulary to 128, the checkpoint has 256" in refused.stderr.strip().splitlines()[-1]


def test_a_prompts_samples_do_not_depend_on_the_prompts_batched_with_it(single_process_parallel):
    """Rows inside their prompt draw no random numbers, so a prompt samples the same continuation
    alone as beside shorter or longer prompts (data-parallel ranks batch different prompts)."""
    from megatron_looprpt.inference.generation import SamplingConfig, generate

    model = build(1)
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=4)
    seeds = [100 + row for row in range(len(PROMPTS))]
    together = generate(model, PROMPTS, VOCAB, cfg, row_seeds=seeds).tokens
    alone = [generate(model, [prompt], VOCAB, cfg, row_seeds=[seed]).tokens[0] for prompt, seed in zip(PROMPTS, seeds)]
    assert together == alone
