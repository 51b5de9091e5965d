"""GRPO and RLTT: each term against a direct computation, and one step's layout parity."""

import math

import pytest
import torch

from megatron_looprpt.models.looped_gpt import LoopedOutput, StepOutput
from megatron_looprpt.rl.grpo import (
    GRPOConfig,
    group_advantages,
    grpo_objective,
    grpo_token_loss,
    step_weights,
    training_batches,
)
from megatron_looprpt.rl.looprpt_loss import TeacherOutputs
from tests.torchrun import run_json


def test_step_weights():
    assert step_weights("last", 3).tolist() == [0, 0, 1]
    assert torch.allclose(step_weights("uniform", 4), torch.full((4,), 0.25))
    assert torch.allclose(step_weights("progressive", 3), torch.tensor([1, 2, 3]) / 6)
    assert torch.allclose(step_weights("1,0,3", 3), torch.tensor([0.25, 0, 0.75]))
    for bad in ("1,2", "fast", "0,0,0", "-1,2,0"):
        with pytest.raises(ValueError, match="step weights"):
            step_weights(bad, 3)


def test_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    adv = group_advantages(rewards)
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))   # no signal when every answer scores alike
    # mean 0.75, population std sqrt(27/16)
    assert torch.allclose(adv[2], (rewards[2] - 0.75) / (math.sqrt(27 / 16) + 1e-6))


def test_token_loss_against_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    logp, old, ref = (-torch.rand(2, 5, generator=g) * 3 for _ in range(3))
    adv, mask = torch.tensor([1.5, -0.7]), (torch.rand(2, 5, generator=g) > 0.3).float()
    loss, terms = grpo_token_loss(logp, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.05)
    expected_pg = expected_kl = 0.0
    for b in range(2):
        for s in range(5):
            if mask[b, s]:
                ratio = math.exp(logp[b, s] - old[b, s])
                a = adv[b].item()
                expected_pg -= min(ratio * a, min(max(ratio, 0.8), 1.2) * a)
                d = (ref[b, s] - logp[b, s]).item()
                expected_kl += math.exp(d) - d - 1
    assert terms["pg"].item() == pytest.approx(expected_pg, rel=1e-5)
    assert terms["kl"].item() == pytest.approx(expected_kl, rel=1e-5)
    assert loss.item() == pytest.approx(expected_pg + 0.05 * expected_kl, rel=1e-5)


def test_training_batches_mask_the_answer_tokens():
    batches = training_batches([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], torch.tensor([0.5, -0.5]),
                               torch.tensor([1.0, 0.0]), seq_length=6, micro_batch_size=2)
    (b,) = batches
    assert b["tokens"][0].tolist() == [1, 2, 3, 7, 0, 0] and b["labels"][0].tolist() == [2, 3, 7, 8, 0, 0]
    assert b["loss_mask"][0].tolist() == [0, 0, 1, 1, 0, 0]      # labels 7 and 8
    assert b["loss_mask"][1].tolist() == [1, 1, 1, 0, 0, 0]      # labels 9, 10, 11
    with pytest.raises(ValueError, match="exceeds --seq-length 3"):
        training_batches([[1, 2, 3]], [[7, 8]], torch.zeros(1), torch.zeros(1), seq_length=3, micro_batch_size=1)


def _objective(weights, step_logp, ref_logp, batch):
    output = LoopedOutput(steps=[StepOutput(gate_logits=torch.zeros(2, 4), label_logprobs=lp) for lp in step_logp])
    reference = TeacherOutputs(logp=ref_logp, gate_logits=torch.zeros(3, 2, 4), entropy=torch.zeros(3, 2, 4))
    return grpo_objective(batch, reference, GRPOConfig(step_weights=weights, kl_coef=0.1), output)


def test_rltt_with_last_step_weights_is_grpo_and_weights_every_step():
    g = torch.Generator().manual_seed(1)
    step_logp = (-torch.rand(3, 2, 4, generator=g)).requires_grad_(True)
    ref_logp = -torch.rand(3, 2, 4, generator=g)
    batch = {"loss_mask": torch.ones(2, 4), "advantages": torch.tensor([1.0, -2.0]), "rewards": torch.ones(2)}
    grpo, _, _ = _objective("last", step_logp, ref_logp, batch)
    rltt_last, _, _ = _objective("0,0,1", step_logp, ref_logp, batch)
    assert torch.equal(grpo, rltt_last)
    (grad_last,) = torch.autograd.grad(grpo, step_logp)
    assert grad_last[:2].abs().sum() == 0 and grad_last[2].abs().sum() > 0
    uniform, count, metrics = _objective("uniform", step_logp, ref_logp, batch)
    (grad_uniform,) = torch.autograd.grad(uniform, step_logp)
    assert all(grad_uniform[t].abs().sum() > 0 for t in range(3))
    assert count.item() == 8 and metrics["grpo_sequences"].item() == 2


@pytest.mark.slow
@pytest.mark.parametrize("algo, weights", [("grpo", "last"), ("grpo", "uniform"), ("rpt", "last")],
                         ids=["grpo", "rltt", "rpt"])
def test_one_step_has_the_same_metrics_under_every_layout(tmp_path, algo, weights):
    harness = "tests/harness/grpo_run.py"
    base = run_json(harness, 1, ["--algo", algo, "--weights", weights], tmp_path / "one.json")
    assert 0 < base[0]["reward_mean"] < 1 and base[0]["grad_norm"] > 0   # a real learning signal
    assert base[1]["kl"] > 0                                            # the policy moved off the reference
    for nproc, flags in ((2, ["--tp", 2]), (2, ["--dist-opt"]), (2, ["--pp", 2])):
        got = run_json(harness, nproc, ["--algo", algo, "--weights", weights, *flags], tmp_path / "got.json")
        for a, b in zip(got, base):
            for name in b:
                # the KL (~1e-2) is a mean of exp(d) - d - 1 over log-prob differences d that fp32
                # reductions in another order shift by ~1e-7: compare it to 1e-6 absolute
                tolerance = 1e-6 if name == "kl" else 1e-7
                assert a[name] == pytest.approx(b[name], rel=1e-5, abs=tolerance), (flags, name)


class _SpaceDroppingTokenizer:
    """Words as tokens; decoding drops a leading space, as SentencePiece does."""

    words = ["<eod>", "the", " cat", " sat", " on", " a", " mat", "."]

    def tokenize(self, text):
        raise NotImplementedError

    def detokenize(self, ids):
        return "".join(self.words[i] for i in ids).lstrip()


def test_rpt_problem_reward_and_positions():
    from megatron_looprpt.rl.rpt import hardest_positions, next_token_problem, prediction_of, rpt_reward

    tok = _SpaceDroppingTokenizer()
    problem = next_token_problem(tok, [1, 2, 3, 4, 5, 6, 7], position=2, horizon=3)   # after "the cat sat"
    assert problem.context == (1, 2, 3)
    assert problem.continuation == " on a mat" and problem.boundaries == (3, 5, 9)
    # answers are decoded after the context, so their leading space survives
    assert problem.answer_text(tok, [4, 5]) == " on a"
    for prediction, expected in ((" on", 1.0), (" on a", 1.0), (" on a mat", 1.0), (" o", 0.0),
                                 ("on", 0.0), (" on a mat.", 0.0), ("", 0.0), (" in", 0.0)):
        assert rpt_reward(prediction, problem) == expected, prediction
    assert prediction_of("I think it is \\boxed{ on a} because") == " on a"
    assert prediction_of("<think>a verb</think> on") == "on"
    assert prediction_of(" on a") == " on a"
    assert problem.reward("<think>hmm</think>\\boxed{ on}") == 1.0

    entropy = torch.tensor([[9.0, 1.0, 5.0, 2.0, 3.0, 8.0], [0.0, 4.0, 1.0, 7.0, 2.0, 9.0]])
    mask = torch.ones(2, 6)
    mask[1, 3] = 0
    # positions 1..3 are eligible (1 token of context, 2 to predict); row 1's best is masked
    assert hardest_positions(entropy, mask, min_context=1, horizon=2) == [2, 1]
    with pytest.raises(ValueError, match="no position"):
        hardest_positions(entropy, mask, min_context=4, horizon=2)
