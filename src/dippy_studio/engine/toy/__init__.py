"""The `toy` profile: a few-million-parameter Flux model trained by this project.

Here, free of any model code: the pictures it learns from (`data`), its word-level tokenizers
(`text`), the check that scores what it draws (`check`) and its committed weights. The training
run that writes them is `engine.toy_training` and the README's grid `engine.toy_grid`: they use
the engine, which builds the profile from this package.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_PATH = Path(__file__).with_name("toy.safetensors")
