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
    score_answers,
    training_batches,
)
from megatron_looprpt.rl.looprpt_loss import TeacherOutputs
from tests.torchrun import run_json


def test_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    adv = group_advantages(rewards)
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))   # no signal when every answer scores alike
    # mean 0.75, population std sqrt(27/16)
    assert torch.allclose(adv[2], (rewards[2] - 0.75) / (math.sqrt(27 / 16) + 1e-6))
    # equal rewards that are not dyadic: their fp32 mean is often an ulp off them, still no signal
    equal = torch.rand(200, 1, generator=torch.Generator().manual_seed(1)).expand(-1, 8).contiguous()
    assert (equal.mean(-1, keepdim=True) != equal).any()
    assert torch.equal(group_advantages(equal), torch.zeros_like(equal))


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
    ratio = torch.exp(logp - old)
    assert terms["clipped"].item() == (((ratio > 1.2) | (ratio < 0.8)) & (mask > 0)).sum().item()


def test_training_batches_mask_the_answer_tokens():
    batches = training_batches([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], torch.tensor([0.5, -0.5]),
                               torch.tensor([1.0, 0.0]), seq_length=6, micro_batch_size=2)
    (b,) = batches
    assert b["tokens"][0].tolist() == [1, 2, 3, 7, 0, 0] and b["labels"][0].tolist() == [2, 3, 7, 8, 0, 0]
    assert b["loss_mask"][0].tolist() == [0, 0, 1, 1, 0, 0]      # labels 7 and 8
    assert b["loss_mask"][1].tolist() == [1, 1, 1, 0, 0, 0]      # labels 9, 10, 11
    with pytest.raises(ValueError, match="exceeds --seq-length 3"):
        training_batches([[1, 2, 3]], [[7, 8]], torch.zeros(1), torch.zeros(1), seq_length=3, micro_batch_size=1)


def _objective(weights, step_logp, ref_logp, batch, old_logp=None):
    def outputs(logp):
        return TeacherOutputs(logp=logp, gate_logits=torch.zeros(3, 2, 4), entropy=torch.zeros(3, 2, 4))

    output = LoopedOutput(steps=[StepOutput(gate_logits=torch.zeros(2, 4), label_logprobs=lp) for lp in step_logp])
    old = None if old_logp is None else outputs(old_logp)
    return grpo_objective(batch, outputs(ref_logp), old, GRPOConfig(step_weights=weights, kl_coef=0.1), output)


def _direct_loss_and_grad(logp, ref, adv, mask, kl_coef, old=None, clip_eps=0.2):
    """The GRPO token loss of one log-prob per token [b, s], and its gradient, written out."""
    loss, grad = 0.0, torch.zeros_like(logp)
    for b in range(logp.shape[0]):
        for s in range(logp.shape[1]):
            if not mask[b, s]:
                continue
            lp, a, d = logp[b, s].item(), adv[b].item(), (ref[b, s] - logp[b, s]).item()
            ratio = 1.0 if old is None else math.exp(lp - old[b, s].item())
            clipped = min(max(ratio, 1 - clip_eps), 1 + clip_eps)
            loss += -min(ratio * a, clipped * a) + kl_coef * (math.exp(d) - d - 1)
            # d(-ratio * a)/dlp = -ratio * a where the unclipped term is the minimum, else 0
            pg_grad = -ratio * a if ratio * a <= clipped * a else 0.0
            grad[b, s] = pg_grad + kl_coef * (1 - math.exp(d))
    return loss, grad


def test_rltt_log_prob_is_the_weighted_sum_over_loop_steps_and_last_step_weights_give_grpo():
    g = torch.Generator().manual_seed(1)
    step_logp = (-torch.rand(3, 2, 4, generator=g)).requires_grad_(True)
    ref_logp = -torch.rand(3, 2, 4, generator=g)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, -2.0])
    batch = {"loss_mask": mask, "advantages": adv, "rewards": torch.ones(2)}
    for weights, w in (("0,0,1", [0.0, 0.0, 1.0]), ("uniform", [1 / 3] * 3), ("progressive", [1 / 6, 2 / 6, 3 / 6])):
        loss, count, metrics = _objective(weights, step_logp, ref_logp, batch)
        # GRPO on the one log-prob sum_t w_t log P_t: with (0, 0, 1) exactly GRPO on the last step
        logp = sum(w[t] * step_logp[t].detach() for t in range(3))
        ref = sum(w[t] * ref_logp[t] for t in range(3))
        expected, grad_logp = _direct_loss_and_grad(logp, ref, adv, mask, kl_coef=0.1)
        assert loss.item() == pytest.approx(expected, rel=1e-5), weights
        (grad,) = torch.autograd.grad(loss, step_logp)
        for t in range(3):   # the chain rule through the weighted sum: w_t times the token's gradient
            assert torch.allclose(grad[t], w[t] * grad_logp, atol=1e-6), (weights, t)
        assert count.item() == 6 and metrics["grpo_sequences"].item() == 2


def test_a_later_update_takes_its_ratio_to_the_sampling_policy_and_clips_it():
    g = torch.Generator().manual_seed(2)
    step_logp = (-torch.rand(3, 2, 4, generator=g)).requires_grad_(True)
    ref_logp = -torch.rand(3, 2, 4, generator=g)
    old_logp = step_logp.detach() + 0.4 * torch.randn(3, 2, 4, generator=g)   # the policy has moved
    mask, adv = torch.ones(2, 4), torch.tensor([0.8, -1.5])
    batch = {"loss_mask": mask, "advantages": adv, "rewards": torch.ones(2)}
    loss, _, metrics = _objective("last", step_logp, ref_logp, batch, old_logp)
    expected, grad_logp = _direct_loss_and_grad(step_logp[2].detach(), ref_logp[2], adv, mask, 0.1, old_logp[2])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    (grad,) = torch.autograd.grad(loss, step_logp)
    assert torch.allclose(grad[2], grad_logp, atol=1e-6)
    ratio = torch.exp(step_logp[2].detach() - old_logp[2])
    assert 0 < metrics["grpo_clipped"].item() == ((ratio - 1).abs() > 0.2).sum().item()


def _word_level_hf_tokenizer(tmp_path):
    """A Hugging Face tokenizer.json whose end-of-text token decodes as text, as GPT-2's and
    Ouro's do ("<|endoftext|>")."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    from megatron_looprpt.data.tokenizers import build_tokenizer

    words = ["<unk>", "<|endoftext|>", "Answer", ":", "12", "13", "the", "cat"]
    hf = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    path = str(tmp_path / "tokenizer.json")
    hf.save(path)
    return build_tokenizer("HuggingFaceTokenizer", path)


def test_answers_are_judged_without_the_stop_token_that_ended_them(tmp_path):
    from megatron_looprpt.data.prompts import PromptProblem

    tok = _word_level_hf_tokenizer(tmp_path)
    answer = tok.tokenize("Answer : 12") + [tok.eod]
    problem = PromptProblem("q", "12")
    assert "<|endoftext|>" in problem.answer_text(tok, answer)          # what spoiled the reward
    assert problem.reward(problem.answer_text(tok, answer)) == 0.0
    wrong = tok.tokenize("Answer : 13") + [tok.eod]
    unfinished = tok.tokenize("Answer : 12")                              # cut by the length limit
    rewards = score_answers([problem] * 3, [answer, wrong, unfinished], tok, (tok.eod,),
                            lambda text, p: p.reward(text))
    assert rewards.tolist() == [1.0, 0.0, 1.0]


@pytest.mark.slow
@pytest.mark.parametrize("algo, weights, extra", [
    ("grpo", "last", []),
    ("grpo", "uniform", ["--epochs", 2]),              # RLTT, and PPO epochs (ratio to the sampling policy)
    ("rpt", "last", []),
    ("rpt", "last", ["--prompts", 1, "--micro", 2]),   # one prompt: the proxy pass pads to PP micro-batches
], ids=["grpo", "rltt-2-epochs", "rpt", "rpt-1-prompt"])
def test_one_step_has_the_same_metrics_under_every_layout(tmp_path, algo, weights, extra):
    harness = "tests/harness/grpo_run.py"
    argv = ["--algo", algo, "--weights", weights, *extra]
    base = run_json(harness, 1, argv, tmp_path / "one.json")
    assert len(base) == 2 and base[0]["grad_norm"] > 0
    assert 0 < base[0]["reward_mean"] < 1 or 0 < base[1]["reward_mean"] < 1   # a real learning signal
    assert base[1]["kl"] > 0                                            # the policy moved off the reference
    layouts = ((2, ["--pp", 2]),) if "--prompts" in extra else ((2, ["--tp", 2]), (2, ["--dist-opt"]), (2, ["--pp", 2]))
    for nproc, flags in layouts:
        got = run_json(harness, nproc, [*argv, *flags], tmp_path / "got.json")
        assert len(got) == len(base)
        for a, b in zip(got, base):
            for name in b:
                # the KL (~1e-2) is a mean of exp(d) - d - 1 over log-prob differences d that fp32
                # reductions in another order shift by ~1e-7: compare it to 1e-6 absolute
                tolerance = 1e-6 if name == "kl" else 1e-7
                assert a[name] == pytest.approx(b[name], rel=1e-5, abs=tolerance), (flags, name)


class _SpaceDroppingTokenizer:
    """Words as tokens; decoding drops a leading space, as SentencePiece does."""

    words = ["<eod>", "the", " cat", " sat", " on", " a", " mat", " ."]

    def tokenize(self, text):
        raise NotImplementedError

    def detokenize(self, ids):
        return "".join(self.words[i] for i in ids).lstrip()


class _InstructedTokenizer(_SpaceDroppingTokenizer):
    def tokenize(self, text):
        return [self.words.index(text)]


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
    # after </think>, line breaks are layout; the leading space is part of the prediction
    assert prediction_of("<think>a verb</think> on") == " on"
    assert prediction_of("<think>a verb</think>\n on") == " on"
    assert prediction_of(" on a") == " on a"
    assert problem.reward("<think>hmm</think>\\boxed{ on}") == 1.0
    assert problem.reward("<think>a verb</think> on") == 1.0
    assert problem.reward("<think>a verb</think>on") == 0.0
    # with an instruction, the prompt is context + instruction and answers decode after both
    asked = next_token_problem(_InstructedTokenizer(), [1, 2, 3, 4, 5, 6, 7], position=2, horizon=3,
                               instruction=" .")
    assert asked.prompt_tokens(tok) == [1, 2, 3, 7] and asked.continuation == " on a mat"
    assert asked.answer_text(tok, [4, 5]) == " on a"

    entropy = torch.tensor([[9.0, 1.0, 5.0, 2.0, 3.0, 8.0], [0.0, 4.0, 1.0, 7.0, 2.0, 9.0]])
    mask = torch.ones(2, 6)
    mask[1, 3] = 0
    # positions 1..4 are eligible (1 token of context, 2 labels to predict from p on); row 1's
    # mask removes the positions whose 2 labels include label 3 (p = 2, 3)
    assert hardest_positions(entropy, mask, min_context=1, horizon=2) == [2, 1]
    tail = torch.ones(2, 6)
    tail[0, 4] = 0          # row 0: p = 3 and 4 would be judged on a masked label
    tail[1] = 0             # row 1: nothing valid, so the mask is ignored rather than the run stopped
    assert hardest_positions(torch.tensor([[0.0, 1.0, 2.0, 5.0, 9.0, 0.0], [0.0, 1.0, 2.0, 3.0, 8.0, 9.0]]),
                             tail, min_context=1, horizon=2) == [2, 4]
    with pytest.raises(ValueError, match="no position"):
        hardest_positions(entropy, mask, min_context=4, horizon=2)
