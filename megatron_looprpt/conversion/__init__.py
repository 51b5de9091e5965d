"""Checkpoint conversion between Hugging Face Ouro checkpoints and megatron_looprpt's
megatron-core (dist_checkpointing) checkpoints, with resharding. Entry: tools/checkpoint/convert.py."""
