"""Deterministic text-to-image generation: the request, the result, and the Engine that runs it.

The steps are the stock FluxPipeline's, called in stages so each can be timed:
LoRA activation -> text encoding -> denoising (latents) -> VAE decode -> PNG encoding.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from time import perf_counter

import torch
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
from dippy_studio.engine.lora import LoraCache, LoraRef
from dippy_studio.engine.profiles import LORA_MODE, EngineOptions, get_profile, load_pipeline
from dippy_studio.protocol.limits import MAX_LORAS, Guidance, ImageSide, Prompt, Seed, Steps

StepCallback = Callable[[int, int], None]


class GenerationRequest(BaseModel):
    """One text-to-image request. Profile-specific limits are checked by the engine."""

    model_config = ConfigDict(frozen=True)

    prompt: Prompt
    seed: Seed
    width: ImageSide = 64
    height: ImageSide = 64
    steps: Steps = 4
    guidance: Guidance = 3.5
    loras: list[LoraRef] = Field(default_factory=list, max_length=MAX_LORAS)


@dataclass(frozen=True)
class Timings:
    """Seconds spent in each stage of one generation."""

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
        self.loras = LoraCache(self.pipe, self.options.lora_cache_size, self.options.lora_dir)
        self.load_seconds = perf_counter() - started
        self._lock = threading.Lock()
        self._pending_load = self.load_seconds  # the first request reports the model load

    @property
    def fingerprint(self) -> str:
        return self.fingerprint_parts.id

    def check(self, request: GenerationRequest) -> None:
        """Raise RequestError when the request is outside this profile's limits."""
        problem = self.spec.image_problem(request.width, request.height, request.steps)
        if problem is not None:
            raise RequestError(problem)

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
        with self.session():
            started = perf_counter()
            active = self.loras.activate(request.loras)
            load = perf_counter() - started + self._pending_load
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
            latents = self._denoise(request, prompt_embeds, pooled_embeds, on_step)
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
        prompt_embeds: torch.Tensor,
        pooled_embeds: torch.Tensor,
        on_step: StepCallback | None,
    ) -> torch.Tensor:
        def step_end(pipe: object, step: int, timestep: object, tensors: dict) -> dict:
            if on_step is not None:
                on_step(step + 1, request.steps)
            return tensors

        # Initial noise always comes from a CPU generator, so CPU and GPU engines start alike.
        generator = torch.Generator("cpu").manual_seed(request.seed)
        output = self.pipe(
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

    def _decode(self, latents: torch.Tensor, height: int, width: int) -> Image.Image:
        # The same arithmetic as FluxPipeline.__call__ with output_type="pil".
        pipe = self.pipe
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents.to(pipe.vae.device), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]
