"""Dippy Studio: a Bittensor subnet for deterministic Flux image generation and LoRA training."""

__version__ = "0.1.0"
