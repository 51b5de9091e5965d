"""Model-size presets (`--model-size`): the shape of the looped model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ModelShape:
    """Everything `--model-size` sets; the field names are the argparse destinations."""

    num_layers: int                 # N: layers of the shared block
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int            # SwiGLU width
    seq_length: int
    max_position_embeddings: int
    loop_steps: int = 4             # T: applications of the block
    vocab_size: Optional[int] = None  # None: the tokenizer decides
    rotary_base: int = 10000
    untie_embeddings_and_output_weights: bool = True  # as Ouro (tie_word_embeddings: false)
    # every loop step after the first re-reads the token embedding (not Ouro's; docs/depth.md):
    # the stage-1 recipe of the CPU presets, off for Ouro's shapes so that they export to Ouro
    loop_input_injection: bool = False


PRESETS = {
    # CPU-sized: the quickstart and the points of tiny scaling studies.
    "tiny": ModelShape(2, 128, 4, 2, 352, 128, 512, loop_input_injection=True),
    "small": ModelShape(2, 192, 6, 2, 512, 128, 512, loop_input_injection=True),
    "medium": ModelShape(3, 256, 8, 4, 704, 128, 512, loop_input_injection=True),
    "base": ModelShape(4, 384, 8, 4, 1024, 128, 512, loop_input_injection=True),
    # Ouro's published shapes (config.json of ByteDance/Ouro-1.4B and Ouro-2.6B: total_ut_steps 4,
    # rope_theta 1e6, 64K positions). Pre-training runs at 4K; the positions allow long context.
    "ouro-1.4b": ModelShape(24, 2048, 16, 16, 5632, 4096, 65536, loop_steps=4, vocab_size=49152,
                            rotary_base=1000000),
    "ouro-2.6b": ModelShape(48, 2048, 16, 16, 5632, 4096, 65536, loop_steps=4, vocab_size=49152,
                            rotary_base=1000000),
}
