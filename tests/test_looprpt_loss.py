"""LoopRPT loss terms and the EMA teacher, each against a direct hand computation.

Tiny case: T = 3 loop steps, b = 2 sequences, s = 4 positions, V = 16.
"""

import math

import pytest
import torch

from fractions import Fraction

from megatron_looprpt.rl.ema import copy_params_, ema_update_
from megatron_looprpt.rl.looprpt_loss import (
    ENTROPY_LEVEL, LoopRPTConfig, StudentOutputs, TeacherOutputs, difficulty, exit_distribution,
    exit_entropy, grpo_advantages, hard_token_count, hard_token_mask, k3_kl,
    looprpt_loss, reference_step, sample_exit_steps, step_rewards)

T, B, S, V, G = 3, 2, 4, 16, 4
DT = torch.float64


def _inputs(seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=DT) * scale).requires_grad_(requires_grad)

    teacher = TeacherOutputs(
        logp=(-torch.rand(T, B, S, generator=g, dtype=DT) * 4).requires_grad_(requires_grad),
        gate_logits=rnd(T, B, S),
        entropy=(torch.rand(T, B, S, generator=g, dtype=DT) * math.log(V))
        .requires_grad_(requires_grad))
    student = StudentOutputs(
        logp=(-torch.rand(T, B, S, generator=g, dtype=DT) * 4).requires_grad_(requires_grad),
        gate_logits=rnd(T, B, S),
        rollout_gate_logits=rnd(G, T, B, S))
    return teacher, student


# ----------------------------------------------------------------------------- exit distribution

def test_exit_distribution_matches_formula_and_sums_to_one():
    gate = torch.randn(T, B, S, dtype=DT, generator=torch.Generator().manual_seed(1))
    lam = torch.sigmoid(gate)
    expected = torch.stack([lam[0], lam[1] * (1 - lam[0]), (1 - lam[0]) * (1 - lam[1])])
    p = exit_distribution(gate)
    torch.testing.assert_close(p, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p.sum(0), torch.ones(B, S, dtype=DT), rtol=1e-12, atol=1e-12)


def test_exit_distribution_is_stable_for_saturated_gates():
    gate = torch.tensor([[80.0, -80.0, -80.0], [-80.0, 80.0, -80.0], [0.0, 0.0, 0.0]]).T  # [T, 3]
    p = exit_distribution(gate)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(0), torch.ones(3))
    torch.testing.assert_close(p[:, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(p[:, 1], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(p[:, 2], torch.tensor([0.5, 0.25, 0.25]))


def test_exit_entropy():
    uniform = torch.full((T, 2), 1.0 / T, dtype=DT)
    torch.testing.assert_close(exit_entropy(uniform), torch.full((2,), math.log(T), dtype=DT))
    one_hot = torch.tensor([[1.0], [0.0], [0.0]], dtype=DT, requires_grad=True)
    h = exit_entropy(one_hot)
    assert h.item() == 0.0
    h.sum().backward()
    assert torch.isfinite(one_hot.grad).all()


# ------------------------------------------------------------------- reference step, difficulty

def test_reference_step_first_cdf_crossing_and_never_reached():
    # Columns: crosses at step 0; at step 1 (cdf exactly q); at step 2; never (mass 0.375 < q,
    # as a rounded CDF that stays below q would be) -> last step.
    p = torch.tensor([[0.6, 0.25, 0.2, 0.125],
                      [0.3, 0.25, 0.2, 0.125],
                      [0.1, 0.50, 0.6, 0.125]])
    t_ref = reference_step(p, 0.5)
    assert t_ref.dtype == torch.long
    assert t_ref.tolist() == [0, 1, 2, 2]
    assert reference_step(p, 0.95).tolist() == [2, 2, 2, 2]


def test_difficulty_normalises_by_log_vocab_and_clamps():
    h = torch.tensor([0.0, 0.5 * math.log(V), math.log(V), 10.0, -1.0], dtype=DT)
    torch.testing.assert_close(difficulty(h, V), torch.tensor([0.0, 0.5, 1.0, 1.0, 0.0], dtype=DT))


# ------------------------------------------------------------------------------------- rewards

def test_step_rewards_hand_table():
    cfg = LoopRPTConfig(time_penalty=0.1, time_penalty_scale=1.0, reward_scale=2.0)
    # Token 0: t_ref = 1, baseline -2, d = 0.5 -> lam = 0.1 * (1 + 0.5) = 0.15.
    # Token 1: t_ref = 2, baseline -1, d = 1.0 -> lam = 0.1.
    s_logp = torch.tensor([[[-3.0, -1.0]], [[-2.0, -1.0]], [[-1.5, -1.0]]], dtype=DT)  # [T,1,2]
    baseline = torch.tensor([[-2.0, -1.0]], dtype=DT)
    t_ref = torch.tensor([[1, 2]])
    d = torch.tensor([[0.5, 1.0]], dtype=DT)
    r = step_rewards(s_logp, baseline, t_ref, d, cfg)
    expected = torch.tensor([[[(-1.0 + 0.15) * 2, (0.0 + 0.2) * 2]],
                             [[0.0, (0.0 + 0.1) * 2]],
                             [[(0.5 - 0.15) * 2, 0.0]]], dtype=DT)
    torch.testing.assert_close(r, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------- hard tokens

def test_hard_tokens_one_per_sequence_at_quarter_ratio():
    ent = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.4, 0.3, 0.7]])
    mask = hard_token_mask(ent, torch.ones(B, S), 0.25)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[False, True, False, False], [False, False, False, True]]
    # Half of the valid tokens -> the top two of each sequence.
    assert hard_token_mask(ent, torch.ones(B, S), 0.5).sum(1).tolist() == [2, 2]


def test_hard_tokens_respect_loss_mask():
    ent = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 0.4, 0.3, 0.7]])
    loss_mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    mask = hard_token_mask(ent, loss_mask, 0.25)
    # The masked high-entropy position is never chosen; an empty sequence gets none.
    assert mask.tolist() == [[False, False, True, False], [False] * 4]


def test_hard_tokens_keep_at_least_one_when_entropies_tie():
    ent = torch.full((1, S), 0.3)
    mask = hard_token_mask(ent, torch.tensor([[1, 1, 0, 0]]), 0.01)
    assert mask.sum() >= 1 and not mask[0, 2:].any()


def test_hard_token_count_in_loss_metrics():
    teacher, student = _inputs()
    cfg = LoopRPTConfig(num_rollouts=G, hard_token_ratio=0.25)
    loss_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    _, m = looprpt_loss(teacher, student, loss_mask, V, cfg, _uniforms(0))
    assert m["num_hard_tokens"].item() == 2
    assert m["num_valid_tokens"].item() == 6
    assert m["hard_token_fraction"].item() == pytest.approx(2 / 6)


def test_hard_token_count_is_the_number_at_or_above_the_exact_quantile():
    for ratio in (0.05, 0.2, 0.25, 1 / 3, 0.5, 0.8, 1.0):
        q = 1 - Fraction(ratio).limit_denominator(1000)
        for n in range(0, 130):
            # distinct values 0..n-1: the linearly interpolated quantile is q (n - 1) itself
            expected = sum(1 for i in range(n) if i >= q * (n - 1))
            assert hard_token_count(torch.tensor(n), ratio).item() == expected, (ratio, n)


def test_hard_tokens_of_a_tied_sequence_survive_round_off():
    # an untrained model: each sequence's entropies lie within a few 1e-3 of one another, and
    # another layout computes them with a different rounding
    g = torch.Generator().manual_seed(40)
    entropy = math.log(512) - 0.02 + 4e-3 * torch.rand(8, 64, generator=g)
    mask = torch.ones(8, 64)
    mask[:, :5] = 0
    other = entropy + 2e-5 * torch.randn(8, 64, generator=g)
    hard = hard_token_mask(entropy, mask, 0.2)
    assert torch.equal(hard, hard_token_mask(other, mask, 0.2))
    assert hard.sum(1).tolist() == [hard_token_count(torch.tensor(59), 0.2).item()] * 8
    # ordered by a scramble of the position: spread over the sequence, not its first tokens
    positions = hard[0].nonzero().flatten()
    assert positions.min() < 16 and positions.max() > 48


def test_hard_tokens_follow_the_entropy_where_it_is_not_tied():
    g = torch.Generator().manual_seed(41)
    entropy = torch.stack([torch.randperm(S * 8, generator=g)[:S] for _ in range(B)]) * 3 * ENTROPY_LEVEL
    entropy = entropy.double() + ENTROPY_LEVEL * torch.rand(B, S, generator=g, dtype=DT)
    for ratio in (0.25, 0.5, 0.75):
        k = hard_token_count(torch.tensor(S), ratio).item()
        expected = torch.zeros(B, S, dtype=torch.bool).scatter_(1, entropy.topk(k, dim=1).indices, True)
        assert torch.equal(hard_token_mask(entropy, torch.ones(B, S), ratio), expected)


# ----------------------------------------------------------------------------- GRPO, k3, sampling

def test_grpo_advantages_hand_case_and_normalisation():
    a = grpo_advantages(torch.tensor([[1.0], [3.0]], dtype=DT), 0.0)
    torch.testing.assert_close(a, torch.tensor([[-1.0], [1.0]], dtype=DT) / math.sqrt(2))
    r = torch.randn(G, B, S, dtype=DT, generator=torch.Generator().manual_seed(2))
    a = grpo_advantages(r, 1e-8)
    torch.testing.assert_close(a.mean(0), torch.zeros(B, S, dtype=DT), atol=1e-12, rtol=0)
    torch.testing.assert_close(a.std(0), torch.ones(B, S, dtype=DT), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        grpo_advantages(r[:1], 1e-8)


def test_grpo_advantages_of_equal_rewards_are_exactly_zero():
    # a group whose rollouts all sampled one step: its fp32 mean is often an ulp off the rewards,
    # which eps = 1e-8 would scale into an advantage of order one (different under each layout)
    values = torch.rand(B, S * 100, generator=torch.Generator().manual_seed(5)) - 0.5
    rewards = values.expand(8, -1, -1).contiguous()   # LoopRPT's default G
    assert (rewards.mean(0) != rewards[0]).any()     # the naive centring is not exact here
    assert torch.equal(grpo_advantages(rewards, 1e-8), torch.zeros_like(rewards))
    # one member apart, the group is normalised as before
    rewards[0] += 1.0
    a = grpo_advantages(rewards, 0.0)
    expected = (rewards - rewards.mean(0)) / rewards.std(0)
    torch.testing.assert_close(a, expected)


def test_k3_kl():
    x = torch.randn(T, B, S, dtype=DT, generator=torch.Generator().manual_seed(3))
    assert torch.equal(k3_kl(x, x), torch.zeros_like(x))
    y = x + torch.randn(T, B, S, dtype=DT, generator=torch.Generator().manual_seed(4))
    kl = k3_kl(x, y)
    delta = x - y
    torch.testing.assert_close(kl, torch.exp(delta) - delta - 1, rtol=1e-12, atol=1e-12)
    assert (kl > 0).all()


def _uniforms(seed, shape=None):
    return torch.rand(shape or (G, B, S), generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_sampling_is_reproducible_and_follows_p():
    gate = torch.randn(G, T, B, S, generator=torch.Generator().manual_seed(5))
    p = exit_distribution(gate.transpose(0, 1)).transpose(0, 1)
    a = sample_exit_steps(p, _uniforms(7))
    torch.manual_seed(123)  # the global RNG must not matter
    torch.rand(10)
    b = sample_exit_steps(p, _uniforms(7))
    assert a.shape == (G, B, S) and a.dtype == torch.long
    assert torch.equal(a, b)
    # Empirical frequencies match p; a zero-probability step is never drawn.
    probs = torch.tensor([0.2, 0.0, 0.5, 0.3]).view(1, 4, 1, 1).expand(1, 4, 1, 40000)
    idx = sample_exit_steps(probs, _uniforms(8, (1, 1, 40000))).flatten()
    freq = torch.bincount(idx, minlength=4).double() / idx.numel()
    assert freq[1] == 0
    expected = torch.tensor([0.2, 0.0, 0.5, 0.3], dtype=DT)
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


# ------------------------------------------------------------------------------------ full loss

def _reference_loss(teacher, student, loss_mask, cfg, sampled):
    """Token-by-token loops written straight from the formulas."""
    total, n_hard = 0.0, 0
    hard = hard_token_mask(teacher.entropy[-1], loss_mask, cfg.hard_token_ratio)
    for bi in range(B):
        for si in range(S):
            if not hard[bi, si]:
                continue
            n_hard += 1
            tg = teacher.gate_logits[:, bi, si].tolist()
            lam = [1 / (1 + math.exp(-x)) for x in tg]
            tp = [lam[0], lam[1] * (1 - lam[0]), (1 - lam[0]) * (1 - lam[1])]
            cdf = [sum(tp[:k + 1]) for k in range(T)]
            t_ref = next((k for k in range(T) if cdf[k] >= cfg.reference_threshold), T - 1)
            base = teacher.logp[t_ref, bi, si].item()
            d = min(max(teacher.entropy[t_ref, bi, si].item() / math.log(V), 0.0), 1.0)
            lam_t = cfg.time_penalty * (1 + cfg.time_penalty_scale * (1 - d))
            slp = student.logp[:, bi, si].tolist()
            r = [((slp[t] - base) - lam_t * (t - t_ref)) * cfg.reward_scale for t in range(T)]
            # policy term
            rg, logpi = [], []
            for g in range(G):
                gl = student.rollout_gate_logits[g, :, bi, si].tolist()
                lg = [1 / (1 + math.exp(-x)) for x in gl]
                pg = [lg[0], lg[1] * (1 - lg[0]), (1 - lg[0]) * (1 - lg[1])]
                k = sampled[g, bi, si].item()
                rg.append(r[k])
                logpi.append(math.log(pg[k]))
            mean = sum(rg) / G
            std = math.sqrt(sum((x - mean) ** 2 for x in rg) / (G - 1))
            adv = [(x - mean) / (std + cfg.eps) for x in rg]
            pg_tok = -sum(a * lp for a, lp in zip(adv, logpi)) / (G if cfg.pg_rollout_reduction == "mean" else 1)
            # backbone, entropy, kl
            sg = student.gate_logits[:, bi, si].tolist()
            ls = [1 / (1 + math.exp(-x)) for x in sg]
            sp = [ls[0], ls[1] * (1 - ls[0]), (1 - ls[0]) * (1 - ls[1])]
            rm = sum(r) / T
            rs = math.sqrt(sum((x - rm) ** 2 for x in r) / (T - 1))
            ahat = [(x - rm) / (rs + cfg.eps) for x in r]
            model_tok = sum(sp[t] * (-slp[t]) * (1 + max(ahat[t], 0.0)) for t in range(T))
            ent_tok = -sum(x * math.log(x) for x in sp)
            tlp = teacher.logp[:, bi, si].tolist()
            k3 = [math.exp(tlp[t] - slp[t]) - (tlp[t] - slp[t]) - 1 for t in range(T)]
            kl_tok = sum(sp[t] * min(k3[t], cfg.kl_clamp) for t in range(T))
            total += (cfg.pg_coef * pg_tok + cfg.model_coef * model_tok
                      - cfg.entropy_coef * ent_tok + cfg.kl_coef * kl_tok)
    return total, n_hard


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_full_loss_matches_token_by_token_reference(reduction):
    teacher, student = _inputs(seed=11)
    cfg = LoopRPTConfig(num_rollouts=G, hard_token_ratio=0.5, time_penalty=0.1,
                        time_penalty_scale=1.0, reward_scale=1.5, entropy_coef=0.1, kl_coef=0.2,
                        pg_rollout_reduction=reduction)
    loss_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    loss, m = looprpt_loss(teacher, student, loss_mask, V, cfg, _uniforms(3))
    rollout_gates = student.rollout_gate_logits.detach().transpose(0, 1)
    rollout_p = exit_distribution(rollout_gates).transpose(0, 1)
    sampled = sample_exit_steps(rollout_p, _uniforms(3))
    ref_sum, n_hard = _reference_loss(teacher, student, loss_mask, cfg, sampled)
    assert m["num_hard_tokens"].item() == n_hard == 4
    assert loss.item() == pytest.approx(ref_sum / n_hard, rel=1e-10)
    recomposed = (cfg.pg_coef * m["pg_loss"] + cfg.model_coef * m["model_loss"]
                  - cfg.entropy_coef * m["entropy"] + cfg.kl_coef * m["kl_loss"])
    assert loss.item() == pytest.approx(recomposed.item(), rel=1e-12)


def test_gradients_reach_student_only():
    teacher, student = _inputs(seed=12)
    cfg = LoopRPTConfig(num_rollouts=G, hard_token_ratio=0.5)
    loss, _ = looprpt_loss(teacher, student, torch.ones(B, S), V, cfg,
                           _uniforms(0))
    loss.backward()
    for t in (student.logp, student.gate_logits, student.rollout_gate_logits):
        assert t.grad is not None and t.grad.abs().sum() > 0
    for t in (teacher.logp, teacher.gate_logits, teacher.entropy):
        assert t.grad is None


def test_policy_gradient_flows_only_through_rollout_gates():
    teacher, student = _inputs(seed=13)
    cfg = LoopRPTConfig(num_rollouts=G, pg_coef=1.0, model_coef=0.0, entropy_coef=0.0, kl_coef=0.0)
    loss, _ = looprpt_loss(teacher, student, torch.ones(B, S), V, cfg,
                           _uniforms(0))
    loss.backward()
    assert student.rollout_gate_logits.grad.abs().sum() > 0
    assert student.logp.grad.abs().sum() == 0 and student.gate_logits.grad.abs().sum() == 0


def test_backbone_and_kl_terms_send_no_gradient_into_the_gate():
    # their exit-probability weights are detached: the gate learns from the rollouts' policy
    # gradient and the entropy bonus only, not by shifting weight onto low-loss steps
    teacher, student = _inputs(seed=15)
    cfg = LoopRPTConfig(num_rollouts=G, pg_coef=0.0, model_coef=1.0, entropy_coef=0.0, kl_coef=0.5)
    loss, _ = looprpt_loss(teacher, student, torch.ones(B, S), V, cfg, _uniforms(0))
    loss.backward()
    assert student.logp.grad.abs().sum() > 0
    assert student.gate_logits.grad is None or student.gate_logits.grad.abs().sum() == 0
    # the entropy bonus alone does reach it
    teacher, student = _inputs(seed=15)
    cfg = LoopRPTConfig(num_rollouts=G, pg_coef=0.0, model_coef=0.0, entropy_coef=1.0, kl_coef=0.0)
    looprpt_loss(teacher, student, torch.ones(B, S), V, cfg, _uniforms(0))[0].backward()
    assert student.gate_logits.grad.abs().sum() > 0


def test_mean_over_rollouts_is_the_sum_divided_by_their_number():
    results = {}
    for reduction in ("sum", "mean"):
        teacher, student = _inputs(seed=16)
        cfg = LoopRPTConfig(num_rollouts=G, kl_coef=0.1, pg_rollout_reduction=reduction)
        loss, m = looprpt_loss(teacher, student, torch.ones(B, S), V, cfg, _uniforms(4))
        loss.backward()
        results[reduction] = (m, student)
    (m_sum, s_sum), (m_mean, s_mean) = results["sum"], results["mean"]
    assert m_sum["pg_loss"].abs() > 0
    torch.testing.assert_close(m_sum["pg_loss"], G * m_mean["pg_loss"], rtol=1e-12, atol=0)
    torch.testing.assert_close(s_sum.rollout_gate_logits.grad, G * s_mean.rollout_gate_logits.grad,
                               rtol=1e-12, atol=0)
    for name in ("model_loss", "kl_loss", "entropy"):
        assert torch.equal(m_sum[name], m_mean[name]), name
    assert torch.equal(s_sum.logp.grad, s_mean.logp.grad)


def test_teacher_baseline_and_reference_step_cancel_from_the_advantages():
    # b and t_ref are constant over a token's steps and rollouts: shifting the teacher's
    # log-probs per token, or moving t_ref while the difficulty stays put, leaves the policy and
    # backbone terms and every student gradient as they were; only the KL (and the reported,
    # unnormalised reward) see it
    g = torch.Generator().manual_seed(17)
    teacher, _ = _inputs(seed=17, requires_grad=False)
    flat_entropy = teacher.entropy[-1:].expand(T, B, S)   # the same at every step: d ignores t_ref
    shift = 3.0 * torch.randn(1, B, S, generator=g, dtype=DT)
    variants = {
        "as is": (TeacherOutputs(teacher.logp, teacher.gate_logits, flat_entropy), 0.5),
        "shifted": (TeacherOutputs(teacher.logp + shift, teacher.gate_logits, flat_entropy), 0.5),
        "other t_ref": (TeacherOutputs(teacher.logp, teacher.gate_logits, flat_entropy), 0.9),
    }
    t_refs = {q: reference_step(exit_distribution(teacher.gate_logits), q) for q in (0.5, 0.9)}
    assert not torch.equal(t_refs[0.5], t_refs[0.9])
    out = {}
    for name, (variant, threshold) in variants.items():
        _, student = _inputs(seed=18)
        cfg = LoopRPTConfig(num_rollouts=G, reference_threshold=threshold, hard_token_ratio=0.5,
                            entropy_coef=0.1, kl_coef=0.0)
        loss, m = looprpt_loss(variant, student, torch.ones(B, S), V, cfg, _uniforms(5))
        loss.backward()
        kl = looprpt_loss(variant, student, torch.ones(B, S), V, cfg, _uniforms(5))[1]["kl_loss"]
        out[name] = (m, [student.logp.grad, student.gate_logits.grad, student.rollout_gate_logits.grad], kl)
    m0, grads0, kl0 = out["as is"]
    assert m0["pg_loss"].abs() > 1e-3 and m0["model_loss"] > 0
    for name in ("shifted", "other t_ref"):
        m, grads, kl = out[name]
        for term in ("pg_loss", "model_loss"):
            torch.testing.assert_close(m[term], m0[term], rtol=1e-9, atol=1e-12)
        for got, expected in zip(grads, grads0):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
        assert not torch.isclose(m["reward_mean"], m0["reward_mean"])
    assert not torch.isclose(out["shifted"][2], kl0)


def test_loss_finite_metrics_and_normalizer_scaling():
    teacher, student = _inputs(seed=14, requires_grad=False)
    cfg = LoopRPTConfig(num_rollouts=G)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])

    def run(normalizer):
        return looprpt_loss(teacher, student, mask, V, cfg, _uniforms(9),
                            normalizer=normalizer)

    loss, m = run(None)
    assert torch.isfinite(loss) and loss.dim() == 0
    for name, value in m.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, name
        assert not value.requires_grad, name
    n = m["num_hard_tokens"]
    loss_sum, m_sum = run(1.0)
    loss_glob, _ = run(torch.tensor(10.0, dtype=DT))
    torch.testing.assert_close(loss * n, loss_sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss_glob * 10.0, loss_sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m["pg_loss"] * n, m_sum["pg_loss"], rtol=1e-12, atol=1e-12)
    assert 1.0 <= m["student_exit_step"].item() <= T and 1.0 <= m["teacher_t_ref"].item() <= T


def test_rollout_count_must_match_config():
    teacher, student = _inputs()
    with pytest.raises(ValueError):
        looprpt_loss(teacher, student, torch.ones(B, S), V, LoopRPTConfig(num_rollouts=G + 1),
                     _uniforms(0))


# ------------------------------------------------------------------------------------------ EMA

def test_copy_params_and_ema_closed_form_constant_student():
    t0 = [torch.randn(3, 2, dtype=DT), torch.randn(5, dtype=DT)]
    s = [torch.randn(3, 2, dtype=DT), torch.randn(5, dtype=DT)]
    teacher = [x.clone() for x in t0]
    decay, k = 0.9, 7
    for _ in range(k):
        ema_update_(teacher, s, decay)
    for tt, a, b in zip(teacher, t0, s):
        expected = decay ** k * a + (1 - decay ** k) * b
        torch.testing.assert_close(tt, expected, rtol=1e-12, atol=1e-12)
    copy_params_(teacher, s)
    for tt, b in zip(teacher, s):
        assert torch.equal(tt, b)


def test_ema_closed_form_changing_student():
    gen = torch.Generator().manual_seed(21)
    t0 = torch.randn(4, 3, dtype=DT, generator=gen)
    students = [torch.randn(4, 3, dtype=DT, generator=gen) for _ in range(5)]
    teacher = [t0.clone()]
    decay, k = 0.8, len(students)
    for s_i in students:
        ema_update_(teacher, [s_i], decay)
    expected = decay ** k * t0 + sum((1 - decay) * decay ** (k - i) * s_i
                                     for i, s_i in enumerate(students, start=1))
    torch.testing.assert_close(teacher[0], expected, rtol=1e-12, atol=1e-12)


def test_ema_works_on_parameters_and_checks_arguments():
    student = torch.nn.Linear(3, 2)
    teacher = torch.nn.Linear(3, 2)
    copy_params_(teacher.parameters(), student.parameters())
    ema_update_(teacher.parameters(), student.parameters(), 0.99)
    for a, b in zip(teacher.parameters(), student.parameters()):
        torch.testing.assert_close(a, b)
        assert a.grad is None
    with pytest.raises(ValueError):
        ema_update_(teacher.parameters(), list(student.parameters())[:1], 0.5)
    with pytest.raises(ValueError):
        ema_update_(teacher.parameters(), student.parameters(), 1.5)
