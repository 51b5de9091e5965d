"""Model-size presets (`--model-size`): the shape of the looped model."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    seq_length: int
    max_position_embeddings: int
    loop_steps: int = 4
    vocab_size: Optional[int] = None
    rotary_base: int = 10000
    untie_embeddings_and_output_weights: bool = True

    def as_flags(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


PRESETS = {
    # CPU-sized: the quickstart and the default of the scaling sweep.
    "tiny": ModelShape(2, 128, 4, 2, 352, 128, 512),
    "small": ModelShape(2, 192, 6, 2, 512, 128, 512),
    "medium": ModelShape(3, 256, 8, 4, 704, 128, 512),
    "base": ModelShape(4, 384, 8, 4, 1024, 128, 512),
    # Ouro's published shapes (config.json of ByteDance/Ouro-1.4B and Ouro-2.6B).
    "ouro-1.4b": ModelShape(24, 2048, 16, 16, 5632, 4096, 65536, loop_steps=4, vocab_size=49152,
                            rotary_base=1000000, untie_embeddings_and_output_weights=True),
    "ouro-2.6b": ModelShape(48, 2048, 16, 16, 5632, 4096, 65536, loop_steps=4, vocab_size=49152,
                            rotary_base=1000000, untie_embeddings_and_output_weights=True),
}
