"""Inference for the looped model: sampling with a KV cache per loop step."""
