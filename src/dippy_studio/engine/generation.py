"""Deterministic generation: the request, the result, and the Engine that runs it.

Every task runs a stock diffusers pipeline, called in stages so each can be timed:
LoRA activation and input reading -> text encoding -> denoising (latents) -> VAE decode ->
PNG encoding. The pipeline depends on the profile's model family (`engine.families`) and the
task: for Flux, text-to-image `FluxPipeline`, edit `FluxKontextPipeline`, img2img
`FluxImg2ImgPipeline`, inpaint `FluxInpaintPipeline` (`FluxFillPipeline` on a Fill profile).
All are built once per engine from the one loaded set of models, so a LoRA or a dtype applies
to every task alike. The family supplies each stage's model-specific part; the staging, the
timings, the determinism and the LoRA cache are the same for every family.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from time import perf_counter
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from dippy_studio.engine.determinism import configure_threads
from dippy_studio.engine.errors import RequestError
from dippy_studio.engine.families import Family
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
    before the models run: LoRA activation, reading and resizing an input image. The models
    themselves load before any request (`Engine.load_seconds`). Encoding an input image into
    latents is part of `denoise`, where the pipeline does it."""

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
        self.family: Family = self.spec.model_family
        started = perf_counter()
        self.pipe = load_pipeline(self.options)
        self.fingerprint_parts = FingerprintParts(
            profile=self.spec.name,
            weights_sha256=weights_sha256(self.pipe, self.family.model_components),
            config_sha256=config_sha256(self.pipe, self.spec.max_sequence_length),
            dtype=self.options.run_dtype,
            device=device_kind(self.options.device),
            threads=self.options.threads,
            lora_mode=LORA_MODE,
            compile=self.options.compile,
            attention_backend=self.options.attention_backend,
            **runtime_parts(),
        )
        self.pipelines = self.family.task_pipelines(self.pipe, self.spec.tasks)
        self.loras = LoraCache(self.pipe, self.options.lora_cache_size, self.options.lora_dir, self.family.lora_format)
        self.load_seconds = perf_counter() - started
        self._lock = threading.Lock()

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
        return twin

    def check(self, request: GenerationRequest) -> None:
        """Raise RequestError when the request is outside this profile's limits or its inputs
        do not fit its task. (Input images are decoded, and refused, in `generate`.)"""
        problem = (
            self.spec.task_problem(request.task)
            or task_inputs_problem(
                request.task, request.image is not None, request.mask is not None, request.strength is not None
            )
            or self.spec.image_problem(request.width, request.height, request.steps, request.task)
        )
        if problem is None and request.loras and not self.family.supports_loras:
            problem = f"profile {self.spec.name} ({self.family.name}) takes no LoRAs"
        if problem is None and request.task in STRENGTH_TASKS and self._denoising_steps(request) < 1:
            problem = (
                f"strength {self._strength(request)} with {request.steps} steps leaves no denoising step; "
                "raise the strength or the steps"
            )
        if problem is not None:
            raise RequestError(problem)

    def _strength(self, request: GenerationRequest) -> float:
        return request.strength if request.strength is not None else self.spec.default_strength

    def _denoising_steps(self, request: GenerationRequest) -> int:
        """The steps img2img and inpainting run: the last `strength` of the schedule, computed
        as the family's pipelines do."""
        return self.family.denoising_steps(request.steps, self._strength(request))

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
            load = perf_counter() - started + prepare

            started = perf_counter()
            text = self.family.encode_prompt(self.pipe, request.prompt, request.guidance, self.spec.max_sequence_length)
            text_encode = perf_counter() - started

            started = perf_counter()
            latents = self._denoise(request, images, text, on_step)
            denoise = perf_counter() - started

            started = perf_counter()
            image = self.family.decode(self.pipe, latents, request.height, request.width)
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
        text: dict[str, Any],
        on_step: StepCallback | None,
    ) -> torch.Tensor:
        total = request.steps
        if request.task in STRENGTH_TASKS:
            total = self._denoising_steps(request)

        def step_end(pipe: object, step: int, timestep: object, tensors: dict) -> dict:
            if on_step is not None:
                on_step(step + 1, total)
            return tensors

        # Initial noise always comes from a CPU generator, so CPU and GPU engines start alike.
        generator = torch.Generator("cpu").manual_seed(request.seed)
        arguments: dict[str, Any] = {
            **text,
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance,
            "generator": generator,
            "output_type": "latent",
            "callback_on_step_end": step_end,
        }
        arguments.update(
            self.family.call_arguments(
                request.task,
                images,
                self._strength(request),
                request.width,
                request.height,
                self.spec.max_sequence_length,
                request.guidance,
            )
        )
        return self.pipelines[request.task](**arguments).images
