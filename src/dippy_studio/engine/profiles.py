"""Model profiles: what a profile is, how its pipeline is built or loaded, and how it is saved.

A profile fixes everything that decides output bits besides the request: weights, dtype,
device, thread count, sequence length, LoRA application mode. `EngineOptions` picks one and
says where its weights come from; `load_pipeline` turns that into a ready FluxPipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from dippy_studio.engine import builtin
from dippy_studio.engine.determinism import configure_cuda, configure_threads, realign_parameters
from dippy_studio.engine.errors import ProfileError
from dippy_studio.engine.options import EngineOptions

PROFILE_MARKER = "dippy_profile.json"
# One LoRA application mode per profile: PEFT layers computed beside the frozen base weights.
# Fusing into the weights differs in the last bits and would make removal lossy.
LORA_MODE = "peft-unfused"


@dataclass(frozen=True)
class ProfileSpec:
    """What a profile serves and the request limits that make sense for it."""

    name: str
    description: str
    builtin: builtin.BuiltinConfig | None
    max_sequence_length: int
    default_steps: int
    default_guidance: float
    min_side: int
    max_side: int
    max_steps: int


PROFILES: dict[str, ProfileSpec] = {
    spec.name: spec
    for spec in (
        ProfileSpec(
            name="tiny",
            description="Flux architecture, ~130k seeded random parameters; the embedded default",
            builtin=builtin.TINY,
            max_sequence_length=builtin.TINY.max_sequence_length,
            default_steps=4,
            default_guidance=3.5,
            min_side=16,
            # A 1-level VAE keeps one latent pixel per image pixel: 256x256 is already 16k
            # tokens and seconds per step on a laptop CPU.
            max_side=256,
            max_steps=50,
        ),
        ProfileSpec(
            name="small",
            description="Flux architecture, ~9M transformer parameters, 4-level VAE; CPU benchmarks",
            builtin=builtin.SMALL,
            max_sequence_length=builtin.SMALL.max_sequence_length,
            default_steps=8,
            default_guidance=3.5,
            min_side=64,
            max_side=1024,
            max_steps=50,
        ),
        ProfileSpec(
            name="flux-dev",
            description="FLUX.1-dev from a local diffusers-layout directory",
            builtin=None,
            max_sequence_length=512,
            default_steps=28,
            default_guidance=3.5,
            min_side=256,
            max_side=2048,
            max_steps=100,
        ),
        ProfileSpec(
            name="flux-schnell",
            description="FLUX.1-schnell from a local diffusers-layout directory",
            builtin=None,
            max_sequence_length=256,
            default_steps=4,
            default_guidance=0.0,
            min_side=256,
            max_side=2048,
            max_steps=16,
        ),
    )
}

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def get_profile(name: str) -> ProfileSpec:
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(PROFILES)
        raise ProfileError(f"unknown profile {name!r}; known profiles: {known}") from None


def profile_in_directory(path: Path) -> str | None:
    """The profile name recorded by `save_pipeline` in a model directory, if any."""
    marker = path / PROFILE_MARKER
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text())["profile"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ProfileError(f"{marker} is not a valid profile marker: {exc}") from None


def load_pipeline(options: EngineOptions) -> FluxPipeline:
    """Build or load the profile's pipeline, ready for deterministic inference."""
    spec = get_profile(options.profile)
    configure_threads(options.threads)
    if options.device == "cuda" and not torch.cuda.is_available():
        raise ProfileError("device 'cuda' was asked for but torch sees no CUDA device")
    if options.device == "cuda":
        configure_cuda()
    dtype = DTYPES[options.dtype]
    if options.model_path is not None:
        pipe = _load_directory(options.model_path, dtype)
    elif spec.builtin is not None:
        pipe = builtin.build_pipeline(spec.builtin)
    else:
        raise ProfileError(
            f"profile {spec.name!r} loads from a local diffusers-layout directory: pass --model-path DIR "
            "(nothing is ever downloaded)"
        )
    if pipe.transformer.dtype != dtype:
        pipe.to(dtype=dtype)
    pipe.to(options.device)
    for module in _modules(pipe):
        module.eval()
        module.requires_grad_(False)
    if options.compile:
        pipe.transformer.compile()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_directory(path: Path, dtype: torch.dtype) -> FluxPipeline:
    if not path.is_dir():
        raise ProfileError(f"model directory {path} does not exist")
    if not (path / "model_index.json").is_file():
        raise ProfileError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    # Library progress bars would interleave with our own output (and break --json on stderr+stdout).
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        pipe = FluxPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ProfileError(f"could not load a Flux pipeline from {path}: {exc}") from exc
    # safetensors memory-maps tensors at unaligned addresses and MKL picks different kernels
    # for them; fresh copies make loaded weights compute exactly like built ones.
    for module in _modules(pipe):
        realign_parameters(module)
    return pipe


def save_pipeline(pipe: FluxPipeline, profile: str, directory: Path) -> None:
    """Write the pipeline in diffusers layout (loadable by stock FluxPipeline) plus a profile marker."""
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory, safe_serialization=True)
    (directory / PROFILE_MARKER).write_text(json.dumps({"profile": profile}, indent=2) + "\n")


def _modules(pipe: FluxPipeline) -> list[torch.nn.Module]:
    return [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae]
