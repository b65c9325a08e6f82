"""Deterministic generation: the request, the result, and the Engine that runs it.

Every task runs a stock diffusers pipeline, called in stages so each can be timed:
LoRA activation and input reading -> text encoding -> denoising (latents) -> VAE decode ->
PNG encoding. The pipeline depends on the task: text-to-image `FluxPipeline`, edit
`FluxKontextPipeline`, img2img `FluxImg2ImgPipeline`, inpaint `FluxInpaintPipeline`
(`FluxFillPipeline` on a Fill profile). All are built once per engine from the one loaded
set of models, so a LoRA or a dtype applies to every task alike.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from time import perf_counter
from typing import Any

import torch
from diffusers import (
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextPipeline,
    FluxPipeline,
)
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from dippy_studio.engine.determinism import configure_threads
from dippy_studio.engine.errors import RequestError
from dippy_studio.engine.fingerprint import (
    FingerprintParts,
    config_sha256,
    device_kind,
    runtime_parts,
    weights_sha256,
)
from dippy_studio.engine.images import encode_png, sha256_hex
from dippy_studio.engine.inputs import TaskImages, read_task_images
from dippy_studio.engine.lora import LoraCache, LoraRef
from dippy_studio.engine.profiles import LORA_MODE, EngineOptions, get_profile, load_pipeline
from dippy_studio.protocol.limits import (
    MAX_LORAS,
    STRENGTH_TASKS,
    Guidance,
    ImageSide,
    Prompt,
    Seed,
    Steps,
    Strength,
    Task,
    task_inputs_problem,
)

StepCallback = Callable[[int, int], None]


class GenerationRequest(BaseModel):
    """One request of any task. Profile-specific limits, and which inputs a task takes
    (`task_inputs_problem`), are checked by the engine (`Engine.check`).

    `width` x `height` is the output size for every task; an image task's input is resized to it
    (callers derive it from the input with `ProfileLimits.output_size` when the user gave none).
    """

    model_config = ConfigDict(frozen=True)

    prompt: Prompt
    seed: Seed
    width: ImageSide = 64
    height: ImageSide = 64
    steps: Steps = 4
    guidance: Guidance = 3.5
    loras: list[LoraRef] = Field(default_factory=list, max_length=MAX_LORAS)
    task: Task = "generate"
    # Encoded image bytes (PNG, JPEG or WebP), decoded inside the engine by protocol.images.
    image: bytes | None = Field(default=None, repr=False)
    # Inpainting: white repaints, black keeps; the input image's size or the output size.
    mask: bytes | None = Field(default=None, repr=False)
    # img2img and inpaint; None: the profile's default_strength.
    strength: Strength | None = None


@dataclass(frozen=True)
class Timings:
    """Seconds spent in each stage of one generation. `load` covers what gets the request ready
    before the models run: LoRA activation, reading and resizing an input image (and the model
    load, on an engine's first request). Encoding an input image into latents is part of
    `denoise`, where the pipeline does it."""

    load: float
    text_encode: float
    denoise: float
    decode: float
    encode: float

    @property
    def total(self) -> float:
        return self.load + self.text_encode + self.denoise + self.decode + self.encode

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class GenerationResult:
    png: bytes
    sha256: str
    width: int
    height: int
    seed: int
    fingerprint: str
    timings: Timings
    loras: list[dict[str, object]] = field(default_factory=list)


class Engine:
    """A loaded profile that turns requests into PNGs, reproducibly.

    One generation runs at a time per engine (the active LoRA set is pipeline state).
    `pipe` is the profile's own pipeline (the class it is saved as); `pipelines` holds one per
    task it serves, all sharing pipe's models, scheduler and tokenizers.
    """

    def __init__(self, options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions()
        self.spec = get_profile(self.options.profile)
        started = perf_counter()
        self.pipe = load_pipeline(self.options)
        self.fingerprint_parts = FingerprintParts(
            profile=self.spec.name,
            weights_sha256=weights_sha256(self.pipe),
            config_sha256=config_sha256(self.pipe, self.spec.max_sequence_length),
            dtype=self.options.dtype,
            device=device_kind(self.options.device),
            threads=self.options.threads,
            lora_mode=LORA_MODE,
            compile=self.options.compile,
            **runtime_parts(),
        )
        self.pipelines = task_pipelines(self.pipe, self.spec.tasks)
        self.loras = LoraCache(self.pipe, self.options.lora_cache_size, self.options.lora_dir)
        self.load_seconds = perf_counter() - started
        self._lock = threading.Lock()
        self._pending_load = self.load_seconds  # the first request reports the model load

    @property
    def fingerprint(self) -> str:
        return self.fingerprint_parts.id

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.spec.tasks

    def with_threads(self, threads: int) -> Engine:
        """This engine run with another thread count: the same loaded models, LoRA cache and lock
        (one generation at a time across both), and the fingerprint of an engine built with
        `threads`, whose bytes it gives. The thread count changes the order of float sums, so it
        is part of the fingerprint; an auditor uses this to re-run a miner's job exactly as the
        miner ran it."""
        twin = copy.copy(self)
        twin.options = self.options.model_copy(update={"threads": threads})
        twin.fingerprint_parts = dataclasses.replace(self.fingerprint_parts, threads=threads)
        twin._pending_load = 0.0
        return twin

    def check(self, request: GenerationRequest) -> None:
        """Raise RequestError when the request is outside this profile's limits or its inputs
        do not fit its task. (Input images are decoded, and refused, in `generate`.)"""
        problem = (
            self.spec.task_problem(request.task)
            or task_inputs_problem(
                request.task, request.image is not None, request.mask is not None, request.strength is not None
            )
            or self.spec.image_problem(request.width, request.height, request.steps)
        )
        if problem is None and request.task in STRENGTH_TASKS and denoising_steps(request, self._strength(request)) < 1:
            problem = (
                f"strength {self._strength(request)} with {request.steps} steps leaves no denoising step; "
                "raise the strength or the steps"
            )
        if problem is not None:
            raise RequestError(problem)

    def _strength(self, request: GenerationRequest) -> float:
        return request.strength if request.strength is not None else self.spec.default_strength

    @contextmanager
    def session(self) -> Iterator[None]:
        """Exclusive use of the pipeline in inference mode, as `generate` runs: for other work on
        the same engine (LoRA evaluation). Adapters loaded outside inference mode could not be
        switched inside it later, and the reverse, so everything that loads one uses this."""
        with self._lock, torch.inference_mode():
            configure_threads(self.options.threads)  # another library may have changed it
            yield

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None) -> GenerationResult:
        self.check(request)
        started = perf_counter()
        images = None
        if request.image is not None:
            size = (request.width, request.height)
            images = read_task_images(request.image, request.mask, size, self.spec.max_input_pixels)
        prepare = perf_counter() - started
        with self.session():
            started = perf_counter()
            active = self.loras.activate(request.loras)
            load = perf_counter() - started + prepare + self._pending_load
            self._pending_load = 0.0

            started = perf_counter()
            prompt_embeds, pooled_embeds, _ = self.pipe.encode_prompt(
                prompt=request.prompt,
                prompt_2=None,
                device=self.pipe.transformer.device,
                max_sequence_length=self.spec.max_sequence_length,
            )
            text_encode = perf_counter() - started

            started = perf_counter()
            latents = self._denoise(request, images, prompt_embeds, pooled_embeds, on_step)
            denoise = perf_counter() - started

            started = perf_counter()
            image = self._decode(latents, request.height, request.width)
            decode = perf_counter() - started

        started = perf_counter()
        png = encode_png(image)
        sha = sha256_hex(png)
        encode = perf_counter() - started
        return GenerationResult(
            png=png,
            sha256=sha,
            width=request.width,
            height=request.height,
            seed=request.seed,
            fingerprint=self.fingerprint,
            timings=Timings(load, text_encode, denoise, decode, encode),
            loras=[{"sha256": a.sha256, "scale": a.scale} for a in active],
        )

    def _denoise(
        self,
        request: GenerationRequest,
        images: TaskImages | None,
        prompt_embeds: torch.Tensor,
        pooled_embeds: torch.Tensor,
        on_step: StepCallback | None,
    ) -> torch.Tensor:
        total = request.steps
        if request.task in STRENGTH_TASKS:
            total = denoising_steps(request, self._strength(request))

        def step_end(pipe: object, step: int, timestep: object, tensors: dict) -> dict:
            if on_step is not None:
                on_step(step + 1, total)
            return tensors

        # Initial noise always comes from a CPU generator, so CPU and GPU engines start alike.
        generator = torch.Generator("cpu").manual_seed(request.seed)
        output = self.pipelines[request.task](
            **self._task_arguments(request, images),
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_embeds,
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            generator=generator,
            max_sequence_length=self.spec.max_sequence_length,
            output_type="latent",
            callback_on_step_end=step_end,
        )
        return output.images

    def _task_arguments(self, request: GenerationRequest, images: TaskImages | None) -> dict[str, Any]:
        """What the task's pipeline takes beyond the text-to-image arguments."""
        if images is None:
            return {}
        if request.task == "edit":
            # Kontext otherwise rescales the output to max_area (1024^2) and the input to its
            # preferred resolutions: both would ignore the requested size.
            return {"image": images.image, "max_area": request.width * request.height, "_auto_resize": False}
        arguments: dict[str, Any] = {"image": images.image, "strength": self._strength(request)}
        if images.mask is not None:
            arguments["mask_image"] = images.mask
        return arguments

    def _decode(self, latents: torch.Tensor, height: int, width: int) -> Image.Image:
        # The same arithmetic as FluxPipeline.__call__ with output_type="pil".
        pipe = self.pipe
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents.to(pipe.vae.device), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]


# The pipeline class of each task; inpainting uses Fill's where the profile is a Fill model.
TASK_PIPELINES: dict[str, type] = {
    "generate": FluxPipeline,
    "edit": FluxKontextPipeline,
    "img2img": FluxImg2ImgPipeline,
    "inpaint": FluxInpaintPipeline,
}


def task_pipelines(pipe: Any, tasks: tuple[str, ...]) -> dict[str, Any]:
    """One pipeline per task, each built on `pipe`'s components (the same module objects, so the
    models are in memory once and a LoRA loaded through `pipe` applies to all of them)."""
    pipelines = {}
    for task in tasks:
        cls = TASK_PIPELINES[task]
        if task == "inpaint" and isinstance(pipe, FluxFillPipeline):
            cls = FluxFillPipeline
        if type(pipe) is cls:
            pipelines[task] = pipe
            continue
        accepted = inspect.signature(cls.__init__).parameters
        built = cls(**{name: part for name, part in pipe.components.items() if name in accepted})
        built.set_progress_bar_config(disable=True)
        pipelines[task] = built
    return pipelines


def denoising_steps(request: GenerationRequest, strength: float) -> int:
    """The steps img2img and inpainting run: the last `strength` of the schedule, computed as
    the diffusers pipelines do (`get_timesteps`)."""
    return request.steps - int(max(request.steps - request.steps * strength, 0))
