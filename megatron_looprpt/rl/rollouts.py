"""Randomness of LoopRPT rollouts, keyed by global sample index.

Each sequence draws its latent noise and its exit-sampling uniforms from a generator seeded by
(seed, global sample index, purpose, loop step). A sequence therefore gets the same noise
whatever micro-batch, data-parallel rank or tensor-parallel rank computes it, which is what
makes LoopRPT's results independent of the parallel layout; every TP rank draws the same full
noise and keeps its own sequence slice under SP.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch


def _generator(seed: int, sample_id: int, purpose: str, step: int = 0, device="cpu") -> torch.Generator:
    """A generator on ``device`` (draws happen where the latents live: no host round trip)."""
    material = f"{seed}|{sample_id}|{purpose}|{step}".encode()
    return torch.Generator(device=device).manual_seed(zlib.crc32(material))


@dataclass(frozen=True)
class LatentNoise:
    """HeadRequest.rollout_noise: G perturbed copies of a step's latent."""

    sample_ids: tuple
    num_rollouts: int
    std: float
    kind: str = "gaussian"   # or "dropout" (std is then the drop probability)
    seed: int = 0

    def __call__(self, step: int, latent: torch.Tensor, seq_offset: int, seq_length: int) -> torch.Tensor:
        seq_local, _, hidden = latent.shape
        draws = []
        for sample_id in self.sample_ids:
            generator = _generator(self.seed, sample_id, "latent", step, latent.device)
            # Always draw the whole sequence: the values at a position must not depend on how
            # much of the sequence this rank holds.
            shape = (self.num_rollouts, seq_length, hidden)
            if self.kind == "gaussian":
                noise = torch.randn(shape, generator=generator, device=latent.device)
            else:
                noise = torch.rand(shape, generator=generator, device=latent.device)
            draws.append(noise[:, seq_offset:seq_offset + seq_local])
        noise = torch.stack(draws, dim=2).to(latent.dtype)  # [G, s, b, h]
        if self.kind == "gaussian":
            return latent.unsqueeze(0) + self.std * noise
        keep = (noise >= self.std).to(latent.dtype) / (1.0 - self.std)
        return latent.unsqueeze(0) * keep


def exit_uniforms(sample_ids, num_rollouts: int, seq_length: int, seed: int) -> torch.Tensor:
    """Uniforms [G, b, s] for sampling each rollout's exit step."""
    return torch.stack(
        [torch.rand(num_rollouts, seq_length, generator=_generator(seed, int(i), "exit"),
                    dtype=torch.float64) for i in sample_ids],
        dim=1,
    )
