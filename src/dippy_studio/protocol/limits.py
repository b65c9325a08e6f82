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
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, Field

MAX_PROMPT_CHARS = 2000
# The largest integer a JavaScript number (and jq, and a browser's JSON) holds exactly: a seed
# copied from any client reproduces the image. It also fits a signed 64-bit column.
MAX_SEED = 2**53 - 1
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
# How far img2img and inpainting move from the input image: 1 repaints it all, 0.1 barely touches it.
Strength = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]

# What an image request does. `generate`: text to image. `edit`: an instruction applied to an
# input image (FLUX.1 Kontext). `img2img`: the prompt drawn over the input image, `strength` of
# the way. `inpaint`: the same inside a mask's white part only.
Task = Literal["generate", "edit", "img2img", "inpaint"]
TASKS: tuple[Task, ...] = get_args(Task)
# The tasks that take an input image, and those that also take a mask and a strength.
IMAGE_TASKS: frozenset[str] = frozenset({"edit", "img2img", "inpaint"})
MASK_TASKS: frozenset[str] = frozenset({"inpaint"})
STRENGTH_TASKS: frozenset[str] = frozenset({"img2img", "inpaint"})


def task_inputs_problem(task: str, has_image: bool, has_mask: bool, has_strength: bool) -> str | None:
    """Why these inputs do not fit `task`, or None: the one rule the public API, the wire and the
    engine all apply."""
    if task not in TASKS:
        return f"unknown task {task!r}; tasks: {', '.join(TASKS)}"
    if has_image != (task in IMAGE_TASKS):
        return f"task {task} {'needs' if task in IMAGE_TASKS else 'takes no'} input image"
    if has_mask != (task in MASK_TASKS):
        return f"task {task} {'needs' if task in MASK_TASKS else 'takes no'} mask"
    if has_strength and task not in STRENGTH_TASKS:
        return f"task {task} takes no strength (img2img and inpaint do)"
    return None


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
    # The tasks its pipelines serve (`Task`).
    tasks: tuple[str, ...] = ("generate", "img2img", "inpaint")
    # The largest input image (pixels) an image task accepts; larger ones are refused, not shrunk
    # silently, so the client knows what the model saw.
    max_input_pixels: int = 4096 * 4096
    default_strength: float = 0.8
    # The dtype an engine runs it in unless told otherwise (`EngineOptions.dtype`): real models in
    # bfloat16, as they are published and served; the built-ins in float32, whose bytes tests pin.
    default_dtype: Literal["float32", "bfloat16"] = "float32"
    # The smallest side an image task's input may have once resized to the output size (FLUX.2's
    # image processor refuses reference images under 64 px).
    min_input_side: int = 0
    # The model family (`engine.families`): which pipelines run it, how LoRAs apply.
    family: str = "flux"
    # Qwen-Image's schedule (a stretched terminal sigma) is undefined for a single step.
    min_steps: int = 1

    @property
    def trains_loras(self) -> bool:
        """Whether LoRA training runs on this profile (only some families train)."""
        return self.family in TRAINING_FAMILIES

    def image_problem(self, width: int, height: int, steps: int, task: str = "generate") -> str | None:
        """Why an image request of this size, step count and task is outside the profile, or None."""
        if task in IMAGE_TASKS and min(width, height) < self.min_input_side:
            return (
                f"task {task} on profile {self.name} needs a width and height of at least {self.min_input_side} "
                "(the input image is resized to the output size)"
            )
        for name, side in (("width", width), ("height", height)):
            if not self.min_side <= side <= self.max_side:
                return f"{name} {side} is outside {self.min_side}..{self.max_side} for profile {self.name}"
        if steps > self.max_steps:
            return f"steps {steps} is over {self.max_steps} for profile {self.name}"
        if steps < self.min_steps:
            return f"steps {steps} is under {self.min_steps} for profile {self.name}"
        return None

    def task_problem(self, task: str) -> str | None:
        if task not in self.tasks:
            return f"profile {self.name} does not serve task {task} (it serves: {', '.join(self.tasks)})"
        return None

    def output_size(self, image_width: int, image_height: int) -> tuple[int, int]:
        """The output size of an image task given no width and height: the input's, scaled down
        (aspect kept) to fit `max_side` and rounded down to multiples of 16, at least `min_side`."""
        scale = min(1.0, self.max_side / max(image_width, image_height))

        def side(pixels: int) -> int:
            rounded = int(pixels * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE
            return min(self.max_side, max(self.min_side, rounded))

        return side(image_width), side(image_height)


# The model families whose profiles train LoRAs; the engine's families declare the same
# (`Family.trains_loras`, a test holds them equal), this copy is for readers without torch.
TRAINING_FAMILIES: frozenset[str] = frozenset({"flux"})


class UnknownProfile(ValueError):
    """No profile has this name."""


PROFILE_LIMITS: dict[str, ProfileLimits] = {
    limits.name: limits
    for limits in (
        ProfileLimits(
            name="tiny",
            description="Flux architecture, ~150k seeded random parameters; the engine's default and the fastest",
            max_sequence_length=32,
            default_steps=4,
            default_guidance=3.5,
            min_side=16,
            # A 1-level VAE keeps one latent pixel per image pixel: 256x256 is already 16k
            # tokens and seconds per step on a laptop CPU.
            max_side=256,
            max_steps=50,
            training=TrainingDefaults(rank=4, alpha=4.0, lr=1e-2, steps=200, batch_size=4, resolution=32),
            # One set of Flux weights runs every task's pipeline (Kontext's architecture is FLUX.1's).
            tasks=TASKS,
            max_input_pixels=1024 * 1024,
        ),
        ProfileLimits(
            name="tiny-kontext",
            description="FLUX.1 Kontext pipeline, tiny's architecture with its own seeded weights; edits offline",
            max_sequence_length=32,
            default_steps=4,
            default_guidance=2.5,
            min_side=16,
            max_side=256,
            max_steps=50,
            training=TrainingDefaults(rank=4, alpha=4.0, lr=1e-2, steps=200, batch_size=4, resolution=32),
            tasks=("edit", "generate"),
            max_input_pixels=1024 * 1024,
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
            tasks=TASKS,
            max_input_pixels=2048 * 2048,
        ),
        ProfileLimits(
            name="toy",
            description=(
                "Flux architecture, ~3.5M parameters trained by the project: one shape (circle, square, "
                "triangle) of a colour on a background, e.g. 'a red circle on a blue background'"
            ),
            max_sequence_length=16,
            default_steps=20,
            # No guidance embedding (schnell-like): the scale is accepted and has no effect.
            default_guidance=0.0,
            # Trained at 64x64 only: at 128x128 its position embeddings run past what it learned
            # and it draws stripes, not shapes.
            min_side=64,
            max_side=64,
            max_steps=50,
            training=TrainingDefaults(rank=8, alpha=8.0, lr=2e-3, steps=200, batch_size=8, resolution=64),
            tasks=("generate", "img2img", "inpaint"),
            max_input_pixels=1024 * 1024,
        ),
        ProfileLimits(
            name="flux-dev",
            description="FLUX.1-dev from a local diffusers-layout directory",
            default_dtype="bfloat16",
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
            default_dtype="bfloat16",
            max_sequence_length=256,
            default_steps=4,
            default_guidance=0.0,
            min_side=256,
            max_side=2048,
            max_steps=16,
        ),
        ProfileLimits(
            name="flux-kontext",
            description="FLUX.1 Kontext [dev] (instruction editing) from a local diffusers-layout directory",
            default_dtype="bfloat16",
            max_sequence_length=512,
            default_steps=28,
            default_guidance=2.5,
            min_side=256,
            max_side=2048,
            max_steps=100,
            tasks=("edit", "generate"),
        ),
        ProfileLimits(
            name="flux-fill",
            description="FLUX.1 Fill [dev] (inpainting) from a local diffusers-layout directory",
            default_dtype="bfloat16",
            max_sequence_length=512,
            default_steps=28,
            default_guidance=30.0,
            min_side=256,
            max_side=2048,
            max_steps=100,
            tasks=("inpaint",),
            default_strength=1.0,
        ),
        ProfileLimits(
            name="tiny-sdxl",
            description="SDXL architecture (UNet, two CLIP encoders), tiny seeded random weights; tests",
            family="sdxl",
            max_sequence_length=77,
            default_steps=4,
            default_guidance=5.0,
            min_side=32,
            max_side=256,
            max_steps=50,
            training=TrainingDefaults(rank=4, alpha=4.0, lr=1e-2, steps=200, batch_size=4, resolution=32),
            tasks=("generate", "img2img", "inpaint"),
            max_input_pixels=1024 * 1024,
        ),
        ProfileLimits(
            name="sdxl",
            description="Stable Diffusion XL 1.0 (base) from a local diffusers-layout directory",
            default_dtype="bfloat16",
            family="sdxl",
            max_sequence_length=77,
            default_steps=30,
            default_guidance=5.0,
            min_side=512,
            max_side=2048,
            max_steps=100,
            tasks=("generate", "img2img", "inpaint"),
        ),
        ProfileLimits(
            name="tiny-zimage",
            description="Z-Image architecture (DiT, Qwen3 text encoder), tiny seeded random weights; tests",
            family="zimage",
            max_sequence_length=64,
            default_steps=4,
            default_guidance=0.0,
            min_side=32,
            max_side=256,
            max_steps=50,
            training=TrainingDefaults(rank=4, alpha=4.0, lr=1e-2, steps=200, batch_size=4, resolution=32),
            tasks=("generate", "img2img", "inpaint"),
            max_input_pixels=1024 * 1024,
        ),
        ProfileLimits(
            name="z-image",
            description="Z-Image-Turbo from a local diffusers-layout directory",
            default_dtype="bfloat16",
            family="zimage",
            max_sequence_length=512,
            default_steps=9,
            default_guidance=0.0,
            min_side=256,
            max_side=2048,
            max_steps=100,
            tasks=("generate", "img2img", "inpaint"),
        ),
        ProfileLimits(
            name="tiny-qwen-image",
            description="Qwen-Image architecture (MMDiT, Qwen2.5-VL text encoder), tiny seeded random weights; tests",
            family="qwen-image",
            min_steps=2,
            max_sequence_length=64,
            default_steps=4,
            # True classifier-free guidance (a second pass), as Qwen-Image runs.
            default_guidance=4.0,
            min_side=32,
            max_side=256,
            max_steps=50,
            training=TrainingDefaults(rank=4, alpha=4.0, lr=1e-2, steps=200, batch_size=4, resolution=32),
            tasks=("generate", "img2img", "inpaint"),
            max_input_pixels=1024 * 1024,
        ),
        ProfileLimits(
            name="qwen-image",
            description="Qwen-Image from a local diffusers-layout directory",
            default_dtype="bfloat16",
            family="qwen-image",
            min_steps=2,
            max_sequence_length=512,
            default_steps=50,
            default_guidance=4.0,
            min_side=256,
            max_side=2048,
            max_steps=100,
            tasks=("generate", "img2img", "inpaint"),
        ),
        ProfileLimits(
            name="tiny-qwen-image-edit",
            description="Qwen-Image-Edit architecture (Qwen2.5-VL sees the input), tiny seeded random weights; tests",
            family="qwen-image",
            min_steps=2,
            max_sequence_length=64,
            default_steps=4,
            default_guidance=4.0,
            min_side=32,
            max_side=256,
            max_steps=50,
            training=TrainingDefaults(rank=4, alpha=4.0, lr=1e-2, steps=200, batch_size=4, resolution=32),
            # QwenImageEditPipeline needs an input image: no text-to-image.
            tasks=("edit",),
            max_input_pixels=1024 * 1024,
        ),
        ProfileLimits(
            name="qwen-image-edit",
            description="Qwen-Image-Edit (instruction editing) from a local diffusers-layout directory",
            default_dtype="bfloat16",
            family="qwen-image",
            min_steps=2,
            max_sequence_length=512,
            default_steps=50,
            default_guidance=4.0,
            min_side=256,
            max_side=2048,
            max_steps=100,
            tasks=("edit",),
        ),
        ProfileLimits(
            name="tiny-flux2",
            description="FLUX.2 [klein] architecture (Qwen3 text encoder), tiny seeded random weights; tests",
            family="flux2",
            min_input_side=64,
            max_sequence_length=64,
            default_steps=4,
            default_guidance=4.0,
            min_side=32,
            max_side=256,
            max_steps=50,
            training=TrainingDefaults(rank=4, alpha=4.0, lr=1e-2, steps=200, batch_size=4, resolution=32),
            tasks=("generate", "edit"),
            max_input_pixels=1024 * 1024,
        ),
        ProfileLimits(
            name="flux2-klein",
            description="FLUX.2 [klein] (text-to-image and reference editing) from a local diffusers-layout directory",
            default_dtype="bfloat16",
            family="flux2",
            min_input_side=64,
            max_sequence_length=512,
            default_steps=50,
            default_guidance=4.0,
            min_side=256,
            max_side=2048,
            max_steps=100,
            tasks=("generate", "edit"),
        ),
        ProfileLimits(
            name="tiny-flux2-dev",
            description="FLUX.2 [dev] architecture (Mistral 3 text encoder), tiny seeded random weights; tests",
            family="flux2",
            min_input_side=64,
            # Flux2Pipeline puts its fixed system message (168 bytes) before every prompt and
            # truncates the whole: with the built-in's byte tokens, 512 leaves the prompt room.
            max_sequence_length=512,
            default_steps=4,
            # Guidance-distilled: an input of the transformer, no second pass.
            default_guidance=4.0,
            min_side=32,
            max_side=256,
            max_steps=50,
            training=TrainingDefaults(rank=4, alpha=4.0, lr=1e-2, steps=200, batch_size=4, resolution=32),
            tasks=("generate", "edit"),
            max_input_pixels=1024 * 1024,
        ),
        ProfileLimits(
            name="flux2-dev",
            description="FLUX.2 [dev] (text-to-image and reference editing) from a local diffusers-layout directory",
            default_dtype="bfloat16",
            family="flux2",
            min_input_side=64,
            max_sequence_length=512,
            default_steps=50,
            default_guidance=4.0,
            min_side=256,
            max_side=2048,
            max_steps=100,
            tasks=("generate", "edit"),
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
