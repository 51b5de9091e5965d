"""megatron-looprpt: looped language models and LoopRPT on megatron-core."""

__version__ = "0.1.0"
