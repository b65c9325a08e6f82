"""What a text-to-image request may ask for, as annotated types that every layer shares: the
engine's `GenerationRequest`, the miner's `InferenceJob` and the orchestrator's public
`ImageRequest`. Light on purpose (no torch import). Profile-specific limits (a model's size and
step range) are checked later, by the engine or the orchestrator that knows the profile."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**63 - 1  # fits a signed 64-bit column in every database
SIZE_MULTIPLE = 16  # VAE downsampling (8) times the 2x2 latent packing of Flux
MAX_SIDE = 4096
MAX_STEPS = 100
MAX_LORAS = 8


def _has_text(prompt: str) -> str:
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    return prompt


def _multiple_of_16(side: int) -> int:
    if side % SIZE_MULTIPLE:
        raise ValueError(f"{side} is not a multiple of {SIZE_MULTIPLE}")
    return side


Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_has_text)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
ImageSide = Annotated[int, Field(ge=SIZE_MULTIPLE, le=MAX_SIDE), AfterValidator(_multiple_of_16)]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
Guidance = Annotated[float, Field(ge=0.0, le=30.0, allow_inf_nan=False)]
LoraScale = Annotated[float, Field(ge=-8.0, le=8.0, allow_inf_nan=False)]
