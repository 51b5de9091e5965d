"""Data layer: tokenizers (``tokenizers``), the built-in default corpus and corpus reading
(``corpus``), and indexed datasets, megatron-core GPT datasets and batches (``datasets``)."""
