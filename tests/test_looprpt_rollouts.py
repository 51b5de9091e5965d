"""LoopRPT's noisy latent rollouts: gate logits and gradients against the G noisy copies built
explicitly, layout independence of the noise, and what backward keeps."""

import pytest
import torch

from megatron_looprpt.models.builder import LoopedModelConfig, transformer_config
from megatron_looprpt.models.exit_gate import ExitGate
from megatron_looprpt.rl.rollouts import NOISE_BLOCK, LatentNoise, exit_uniforms

G, B, H = 3, 2, 8
SEQ = 2 * NOISE_BLOCK + 40   # three noise blocks, the last one partial


def _gate():
    cfg = LoopedModelConfig(num_layers=1, hidden_size=H, num_attention_heads=1, vocab_size=16,
                            max_position_embeddings=SEQ, loop_steps=4)
    # a per-step bias (--exit-gate-init uniform), so that a rollout gated at the wrong step differs
    gate = ExitGate(transformer_config(cfg), step_bias_steps=4)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(1, H, generator=torch.Generator().manual_seed(1)))
        gate.bias.fill_(0.2)
        gate.step_bias.copy_(torch.tensor([-0.7, 0.4, 0.1, 0.0]))
    return gate


def _latent(seq=SEQ):
    return torch.randn(seq, B, H, generator=torch.Generator().manual_seed(2)).requires_grad_()


def _noise(kind="gaussian", gate_only=False):
    return LatentNoise(sample_ids=(5, 11), num_rollouts=G, std=0.3 if kind == "gaussian" else 0.25,
                       kind=kind, seed=9, gate_only=gate_only)


def _weights(seq=SEQ):
    return torch.randn(G, seq, B, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind", ["gaussian", "dropout"])
def test_gate_logits_and_gradients_equal_those_of_explicit_noisy_copies(kind):
    noise, gate, weights = _noise(kind), _gate(), _weights()
    latent = _latent()
    logits = noise(step=1, latent=latent, gate=gate, seq_offset=0)
    (logits * weights).sum().backward()
    got = [latent.grad.clone(), gate.weight.grad.clone(), gate.bias.grad.clone()]

    latent.grad, gate.weight.grad, gate.bias.grad = None, None, None
    copies = noise.perturb(latent, noise.draw(1, 0, SEQ, H, latent.device))   # [G, s, b, h]
    expected = gate(copies, 1)
    (expected * weights).sum().backward()
    assert logits.shape == (G, SEQ, B)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    # the weight's gradient sums G x s x b fp32 terms, blockwise here and at once there
    for g, e in zip(got, [latent.grad, gate.weight.grad, gate.bias.grad]):
        torch.testing.assert_close(g, e, rtol=2e-5, atol=1e-5)
    assert got[0].abs().sum() > 0


@pytest.mark.parametrize("offset, length", [(0, NOISE_BLOCK), (NOISE_BLOCK, NOISE_BLOCK + 40),
                                            (100, 60), (SEQ - 7, 7)])
def test_a_sequence_slice_gets_the_noise_of_its_positions(offset, length):
    # what a rank under sequence parallelism computes for its slice is that slice of the whole
    noise, gate = _noise(), _gate()
    latent = _latent().detach()
    full = noise(step=2, latent=latent, gate=gate, seq_offset=0)
    part = noise(step=2, latent=latent[offset:offset + length], gate=gate, seq_offset=offset)
    # the noise itself bit for bit; the gate's logits to fp32 round-off, since a product over
    # another number of rows may take another CPU kernel (7 rows rounded otherwise than 289 here)
    torch.testing.assert_close(noise.draw(2, offset, offset + length, H, latent.device),
                               noise.draw(2, 0, SEQ, H, latent.device)[:, offset:offset + length],
                               rtol=0, atol=0)
    torch.testing.assert_close(part, full[:, offset:offset + length], rtol=1e-6, atol=1e-6)
    # and it is keyed by sample, step and position, not by the company a sample keeps
    alone = LatentNoise((11,), G, noise.std, seed=noise.seed)(2, latent[:, 1:], gate, 0)
    torch.testing.assert_close(alone[..., 0], full[..., 1], rtol=0, atol=0)
    assert not torch.equal(noise(3, latent, gate, 0), full)


def test_backward_keeps_no_copy_of_the_noisy_latents():
    noise, gate = _noise(), _gate()
    latent = _latent()
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = noise(step=0, latent=latent, gate=gate, seq_offset=0)
    (logits * _weights()).sum().backward()
    # the latent itself may be kept; G copies of it, or of a block of it, may not
    assert saved and max(saved) <= latent.numel()
    assert sum(saved) < G * NOISE_BLOCK * B * H


def test_gate_only_rollouts_send_no_gradient_into_the_latent():
    gate, latent = _gate(), _latent()
    (_noise(gate_only=True)(0, latent, gate, 0) * _weights()).sum().backward()
    assert latent.grad is None and gate.weight.grad.abs().sum() > 0


def test_exit_uniforms_are_keyed_by_sample():
    both = exit_uniforms((4, 8), G, 10, seed=1)
    assert both.shape == (G, 2, 10) and both.dtype == torch.float64
    torch.testing.assert_close(exit_uniforms((8,), G, 10, seed=1)[:, 0], both[:, 1], rtol=0, atol=0)
    assert not torch.equal(exit_uniforms((4, 8), G, 10, seed=2), both)
