"""What a request may ask for, read by every layer: the engine checks it, the miner's jobs and
the orchestrator's public API validate against it.

Two parts, both light on purpose (pydantic and the standard library only, no torch):

- Annotated types every text-to-image request shares (`Prompt`, `Seed`, `ImageSide`, ...):
  the engine's `GenerationRequest`, the miner's `InferenceJob`, the orchestrator's `ImageRequest`.
- Per-profile limits (`PROFILE_LIMITS`): the size and step range a model serves, its defaults,
  and the LoRA training defaults. The engine builds its profiles from this table, and the
  orchestrator checks a request against it without loading a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, Field

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**63 - 1  # fits a signed 64-bit column in every database
SIZE_MULTIPLE = 16  # VAE downsampling (8) times the 2x2 latent packing of Flux
# The largest any profile serves (`PROFILE_LIMITS` below; a test holds them equal): what every
# request schema accepts at most, so a published schema allows nothing all servers refuse.
MAX_SIDE = 2048
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


# The validators keep their own messages (they name the value); `json_schema_extra` states the
# same rules in the JSON schema, for clients and generated tests.
Prompt = Annotated[
    str,
    Field(min_length=1, max_length=MAX_PROMPT_CHARS, json_schema_extra={"pattern": r"\S"}),
    AfterValidator(_has_text),
]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
ImageSide = Annotated[
    int,
    Field(ge=SIZE_MULTIPLE, le=MAX_SIDE, json_schema_extra={"multipleOf": SIZE_MULTIPLE}),
    AfterValidator(_multiple_of_16),
]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
Guidance = Annotated[float, Field(ge=0.0, le=30.0, allow_inf_nan=False)]
LoraScale = Annotated[float, Field(ge=-8.0, le=8.0, allow_inf_nan=False)]


# The transformer layers a LoRA adapts unless a job names others: attention in every block.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class TrainingDefaults:
    """What a LoRA training run uses for the options it leaves out."""

    rank: int
    alpha: float
    lr: float
    steps: int
    batch_size: int
    resolution: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Common Flux LoRA practice (ai-toolkit, diffusers' dreambooth script) for the real models;
# the built-ins get settings that learn something visible in seconds on a CPU.
REAL_MODEL_TRAINING = TrainingDefaults(rank=16, alpha=16.0, lr=1e-4, steps=1000, batch_size=1, resolution=512)


@dataclass(frozen=True)
class ProfileLimits:
    """What a profile serves and the request limits that make sense for it."""

    name: str
    description: str
    max_sequence_length: int
    default_steps: int
    default_guidance: float
    min_side: int
    max_side: int
    max_steps: int
    training: TrainingDefaults = REAL_MODEL_TRAINING

    def image_problem(self, width: int, height: int, steps: int) -> str | None:
        """Why an image request of this size and step count is outside the profile, or None."""
        for name, side in (("width", width), ("height", height)):
            if not self.min_side <= side <= self.max_side:
                return f"{name} {side} is outside {self.min_side}..{self.max_side} for profile {self.name}"
        if steps > self.max_steps:
            return f"steps {steps} is over {self.max_steps} for profile {self.name}"
        return None


class UnknownProfile(ValueError):
    """No profile has this name."""


PROFILE_LIMITS: dict[str, ProfileLimits] = {
    limits.name: limits
    for limits in (
        ProfileLimits(
            name="tiny",
            description="Flux architecture, ~130k seeded random parameters; the embedded default",
            max_sequence_length=32,
            default_steps=4,
            default_guidance=3.5,
            min_side=16,
            # A 1-level VAE keeps one latent pixel per image pixel: 256x256 is already 16k
            # tokens and seconds per step on a laptop CPU.
            max_side=256,
            max_steps=50,
            training=TrainingDefaults(rank=4, alpha=4.0, lr=1e-2, steps=200, batch_size=4, resolution=32),
        ),
        ProfileLimits(
            name="small",
            description="Flux architecture, ~9M transformer parameters, 4-level VAE; CPU benchmarks",
            max_sequence_length=64,
            default_steps=8,
            default_guidance=3.5,
            min_side=64,
            max_side=1024,
            max_steps=50,
            training=TrainingDefaults(rank=8, alpha=8.0, lr=1e-3, steps=300, batch_size=2, resolution=128),
        ),
        ProfileLimits(
            name="flux-dev",
            description="FLUX.1-dev from a local diffusers-layout directory",
            max_sequence_length=512,
            default_steps=28,
            default_guidance=3.5,
            min_side=256,
            max_side=2048,
            max_steps=100,
        ),
        ProfileLimits(
            name="flux-schnell",
            description="FLUX.1-schnell from a local diffusers-layout directory",
            max_sequence_length=256,
            default_steps=4,
            default_guidance=0.0,
            min_side=256,
            max_side=2048,
            max_steps=16,
        ),
    )
}


def profile_limits(name: str) -> ProfileLimits:
    try:
        return PROFILE_LIMITS[name]
    except KeyError:
        known = ", ".join(PROFILE_LIMITS)
        raise UnknownProfile(f"unknown profile {name!r}; known profiles: {known}") from None


def training_defaults(name: str) -> dict[str, Any]:
    """The profile's training defaults as a fresh dict (rank, alpha, lr, steps, batch_size, resolution)."""
    return profile_limits(name).training.as_dict()
