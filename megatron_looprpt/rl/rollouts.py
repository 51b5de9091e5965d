"""Noisy latent rollouts of LoopRPT: the exit gate on G perturbed copies of each step's latent.

Randomness is keyed by global sample index: a sequence's latent noise comes from generators
seeded by (seed, sample index, loop step, block of NOISE_BLOCK positions), its exit-sampling
uniforms from one seeded by (seed, sample index). The values at a position therefore do not
depend on the micro-batch, data-parallel rank or tensor-parallel rank that computes them, nor on
how much of the sequence a rank holds: under sequence parallelism each rank draws only the
blocks its slice touches.

Memory: the G noisy copies [G, s, b, h] are never kept. Each block's copies are built, gated
and dropped inside an activation checkpoint, so backward saves only the latent (which the step
keeps anyway) and redraws the block's noise from its generators.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

# Positions per noise draw. Fixed, not derived from the layout: it decides which values a
# position gets. Large enough that a step costs few draws, small enough that one block's noisy
# copies are a small transient (G x 128 x b x h).
NOISE_BLOCK = 128


def _generator(seed: int, sample_id: int, purpose: str, step: int, block: int, device) -> torch.Generator:
    material = f"{seed}|{sample_id}|{purpose}|{step}|{block}".encode()
    return torch.Generator(device=device).manual_seed(zlib.crc32(material))


@dataclass(frozen=True)
class LatentNoise:
    """HeadRequest.rollout_noise: gate logits of G perturbed copies of a step's latent.

    ``gate_only`` detaches the latent first, so that the policy gradient trains the exit gate
    alone; by default it also flows through the noisy latents into the backbone, as in the
    authors' trainer.
    """

    sample_ids: tuple
    num_rollouts: int
    std: float
    kind: str = "gaussian"   # or "dropout" (std is then the drop probability)
    seed: int = 0
    gate_only: bool = False

    def draw(self, step: int, start: int, end: int, hidden: int, device) -> torch.Tensor:
        """The noise of positions [start, end) of every sequence, [G, end - start, b, h], fp32.
        Positions count from the start of the sequence, whichever rank asks."""
        per_sample = []
        for sample_id in self.sample_ids:
            pieces = []
            for block in range(start // NOISE_BLOCK, (end - 1) // NOISE_BLOCK + 1):
                base = block * NOISE_BLOCK
                generator = _generator(self.seed, int(sample_id), "latent", step, block, device)
                shape = (self.num_rollouts, NOISE_BLOCK, hidden)
                if self.kind == "gaussian":
                    values = torch.randn(shape, generator=generator, device=device)
                else:
                    values = torch.rand(shape, generator=generator, device=device)
                pieces.append(values[:, max(start, base) - base:min(end, base + NOISE_BLOCK) - base])
            per_sample.append(torch.cat(pieces, dim=1))
        return torch.stack(per_sample, dim=2)

    def perturb(self, latent: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """G noisy copies [G, s, b, h] of ``latent`` [s, b, h]."""
        noise = noise.to(latent.dtype)
        if self.kind == "gaussian":
            return latent.unsqueeze(0) + self.std * noise
        return latent.unsqueeze(0) * ((noise >= self.std).to(latent.dtype) / (1.0 - self.std))

    def _block_gate_logits(self, gate, latent: torch.Tensor, step: int, start: int) -> torch.Tensor:
        noise = self.draw(step, start, start + latent.shape[0], latent.shape[-1], latent.device)
        return gate(self.perturb(latent, noise), step)

    def __call__(self, step: int, latent: torch.Tensor, gate, seq_offset: int) -> torch.Tensor:
        """Gate logits [G, s_local, b] of the noisy copies of ``latent`` [s_local, b, h], this
        rank's slice of the sequence starting at position ``seq_offset``."""
        if self.gate_only:
            latent = latent.detach()
        end = seq_offset + latent.shape[0]
        logits = []
        for block_start in range(seq_offset - seq_offset % NOISE_BLOCK, end, NOISE_BLOCK):
            lo, hi = max(seq_offset, block_start), min(end, block_start + NOISE_BLOCK)
            piece = latent[lo - seq_offset:hi - seq_offset]
            if torch.is_grad_enabled():
                # our generators, not the global RNG, make the recomputation draw the same noise
                logits.append(checkpoint(self._block_gate_logits, gate, piece, step, lo,
                                         use_reentrant=False, preserve_rng_state=False))
            else:
                logits.append(self._block_gate_logits(gate, piece, step, lo))
        return torch.cat(logits, dim=1)


def exit_uniforms(sample_ids, num_rollouts: int, seq_length: int, seed: int, device="cpu") -> torch.Tensor:
    """Uniforms [G, b, s] (fp64) for sampling each rollout's exit step, drawn on ``device``."""
    return torch.stack(
        [torch.rand(num_rollouts, seq_length, dtype=torch.float64, device=device,
                    generator=_generator(seed, int(i), "exit", 0, 0, device)) for i in sample_ids],
        dim=1,
    )
