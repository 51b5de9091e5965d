"""LoopRPT through the looped model, one process: where the policy gradient goes, and a step
that never waits for the device."""

import os
import sys

import pytest
import torch

import megatron_looprpt

from megatron_looprpt.models.builder import LoopedModelConfig, build_model
from megatron_looprpt.models.exit_gate import exit_log_distribution
from megatron_looprpt.models.looped_gpt import HeadRequest
from megatron_looprpt.rl.looprpt_loss import (LoopRPTConfig, StudentOutputs, TeacherOutputs,
                                              difficulty, exit_distribution, grpo_advantages,
                                              hard_token_mask, looprpt_loss, reference_step,
                                              sample_exit_steps, step_rewards)
from megatron_looprpt.rl.objective import (RolloutConfig, make_looprpt_forward_step,
                                           plan_batches)
from megatron_looprpt.rl.rollouts import LatentNoise, exit_uniforms
from megatron_looprpt.rl.teacher import EMATeacher
from megatron_looprpt.schedule import run_schedule

PACKAGE = os.path.dirname(os.path.abspath(megatron_looprpt.__file__))
T, B, S, V, G = 3, 2, 12, 128, 4
SAMPLE_IDS = (7, 19)


def _config():
    return LoopedModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                             ffn_hidden_size=96, vocab_size=V, max_position_embeddings=32, loop_steps=T,
                             make_vocab_size_divisible_by=64)


def _batch(first_sample=0):
    g = torch.Generator().manual_seed(first_sample)
    tokens = torch.randint(0, V, (B, S + 1), generator=g)
    mask = torch.ones(B, S)
    mask[0, :3] = 0
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
            "position_ids": torch.arange(S).expand(B, -1),
            "sample_ids": torch.arange(first_sample, first_sample + B)}


def _teacher(seed=1):
    g = torch.Generator().manual_seed(seed)
    return TeacherOutputs(logp=-4 * torch.rand(T, B, S, generator=g), gate_logits=torch.randn(T, B, S, generator=g),
                          entropy=4 * torch.rand(T, B, S, generator=g))


def _policy_loss_by_hand(model, hiddens, noise, teacher, student_logp, loss_mask, cfg, uniforms):
    """The policy term written out: G noisy copies of each step's latent, the exit gate on them,
    the sampled step's log-probability weighted by its GRPO advantage, summed over rollouts."""
    gates = torch.stack([model.exit_gate(noise.perturb(h, noise.draw(t, 0, S, h.shape[-1], h.device)), t)
                         for t, h in enumerate(hiddens)])                     # [T, G, s, b]
    log_p = exit_log_distribution(gates).permute(1, 0, 3, 2)                  # [G, T, b, s]
    sampled = sample_exit_steps(log_p.detach().exp(), uniforms)
    log_pi = log_p.gather(1, sampled.unsqueeze(1)).squeeze(1)
    t_ref = reference_step(exit_distribution(teacher.gate_logits), cfg.reference_threshold)
    baseline = teacher.logp.gather(0, t_ref.unsqueeze(0)).squeeze(0)
    d = difficulty(teacher.entropy.gather(0, t_ref.unsqueeze(0)).squeeze(0), V)
    rewards = step_rewards(student_logp.detach(), baseline, t_ref, d, cfg).gather(0, sampled)
    hard = hard_token_mask(teacher.entropy[-1], loss_mask, cfg.hard_token_ratio)
    pg = -(grpo_advantages(rewards, cfg.eps) * log_pi).sum(0)
    return (pg * hard).sum() / hard.sum()


@pytest.mark.parametrize("gate_only", [False, True])
def test_policy_gradient_reaches_the_latents_as_computed_directly(single_process_parallel, gate_only):
    from megatron_looprpt.models.builder import build_stage
    from megatron_looprpt.models.init_weights import init_weights

    torch.manual_seed(0)
    model = build_stage(_config())
    init_weights(model, seed=3, std=0.05, effective_depth=2 * T)
    with torch.no_grad():
        model.exit_gate.weight.normal_(0, 0.3)
    batch, teacher = _batch(), _teacher()
    noise = LatentNoise(SAMPLE_IDS, G, std=0.5, seed=2, gate_only=gate_only)
    cfg = LoopRPTConfig(num_rollouts=G, hard_token_ratio=0.5, model_coef=0.0, entropy_coef=0.0, kl_coef=0.0)
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                head=HeadRequest(rollout_noise=noise, hidden=True))
    hiddens = [step.hidden for step in out.steps]
    student = StudentOutputs(logp=out.stack("label_logprobs"), gate_logits=out.stack("gate_logits"),
                             rollout_gate_logits=out.stack("rollout_gate_logits").transpose(0, 1))
    uniforms = exit_uniforms(SAMPLE_IDS, G, S, seed=4)
    loss, m = looprpt_loss(teacher, student, batch["loss_mask"], V, cfg, uniforms)
    got = torch.autograd.grad(loss, hiddens, retain_graph=True, allow_unused=True)
    if gate_only:
        # the zero-weighted terms keep the latents in the graph, with zero gradient
        assert all(g is None or not g.any() for g in got)
        return
    direct = _policy_loss_by_hand(model, hiddens, noise, teacher, student.logp, batch["loss_mask"], cfg, uniforms)
    torch.testing.assert_close(loss, direct, rtol=1e-6, atol=1e-7)
    expected = torch.autograd.grad(direct, hiddens)
    for step, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
        # the last step's gate is not part of the exit distribution (that step takes what is left)
        assert (g.abs().sum() > 0) == (step < T - 1), step


def test_a_looprpt_step_makes_no_host_syncs(single_process_parallel, monkeypatch):
    cfg = _config()
    pm = build_model(cfg, seed=5)
    teacher = EMATeacher(cfg, pm, seed=5)
    batches = [_batch(0), _batch(B)]
    rl_cfg = LoopRPTConfig(num_rollouts=G, hard_token_ratio=0.5)
    planned = plan_batches(batches)

    def refusing(original):
        # only our code is held to it: megatron's RNG tracker compares CPU RNG states with .item()
        def call(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE):
                raise AssertionError(f"a host sync inside the LoopRPT step ({caller})")
            return original(self, *args, **kwargs)
        return call

    monkeypatch.setattr(torch.Tensor, "tolist", refusing(torch.Tensor.tolist))
    monkeypatch.setattr(torch.Tensor, "item", refusing(torch.Tensor.item))
    outputs = teacher.run(batches)
    forward_step = make_looprpt_forward_step(outputs, rl_cfg, V, RolloutConfig(seed=3))
    metrics = run_schedule(pm, planned, forward_step, forward_only=False)
    monkeypatch.undo()
    assert metrics["rl_hard_tokens"].item() > 0 and not outputs
    assert any(p.main_grad.abs().sum() > 0 for p in pm.model.decoder.parameters())
