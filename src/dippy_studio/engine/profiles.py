"""Model profiles: what a profile is, how its pipeline is built or loaded, and how it is saved.

A profile fixes everything that decides output bits besides the request: weights, dtype,
device, thread count, sequence length, LoRA application mode. `EngineOptions` picks one and
says where its weights come from; `load_pipeline` turns that into a ready pipeline of the
profile's class (FluxPipeline; FluxKontextPipeline for the Kontext profiles, FluxFillPipeline
for flux-fill), the class its saved directory records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import FluxFillPipeline, FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.utils import logging as transformers_logging

from dippy_studio.engine import builtin
from dippy_studio.engine.determinism import configure_cuda, configure_threads, realign_parameters
from dippy_studio.engine.errors import ProfileError
from dippy_studio.engine.lora import LayerModels
from dippy_studio.engine.options import EngineOptions
from dippy_studio.protocol.limits import PROFILE_LIMITS, ProfileLimits

PROFILE_MARKER = "dippy_profile.json"
# One LoRA application mode per profile: PEFT layers computed beside the frozen base weights.
# Fusing into the weights differs in the last bits and would make removal lossy.
LORA_MODE = "peft-unfused"


# Built from the lightweight table in protocol.limits (which the orchestrator reads without
# loading torch) plus, for the built-ins, the architecture that builds their weights.
_BUILTINS: dict[str, builtin.BuiltinConfig] = {
    "tiny": builtin.TINY,
    "tiny-kontext": builtin.TINY_KONTEXT,
    "small": builtin.SMALL,
}
# The pipeline class a profile is built, loaded and saved as (FluxPipeline when not listed).
# The engine builds the other tasks' pipelines from the same components.
_PIPELINE_CLASSES: dict[str, type] = {
    "tiny-kontext": FluxKontextPipeline,
    "flux-kontext": FluxKontextPipeline,
    "flux-fill": FluxFillPipeline,
}


@dataclass(frozen=True)
class ProfileSpec(ProfileLimits):
    """A profile's request limits plus where its weights come from: a built-in architecture,
    or (None) a local diffusers-layout directory."""

    builtin: builtin.BuiltinConfig | None = None
    pipeline_class: type = FluxPipeline


def _spec(limits: ProfileLimits) -> ProfileSpec:
    return ProfileSpec(
        **{f.name: getattr(limits, f.name) for f in fields(limits)},
        builtin=_BUILTINS.get(limits.name),
        pipeline_class=_PIPELINE_CLASSES.get(limits.name, FluxPipeline),
    )


PROFILES: dict[str, ProfileSpec] = {name: _spec(limits) for name, limits in PROFILE_LIMITS.items()}

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


@lru_cache(maxsize=8)
def layer_models(profile: str, model_path: Path | None = None) -> LayerModels | None:
    """The profile's transformer and CLIP text encoder on the meta device: every layer's name and
    shape, no weights, built in a fraction of a second even for FLUX.1. What a LoRA is checked
    against (`lora.lora_fit_problem`) where no model is loaded. The architecture comes from the
    model directory when given, else from the built-in profile; None when neither is known."""
    spec = get_profile(profile)
    with torch.device("meta"):
        if model_path is not None:
            try:
                transformer = FluxTransformer2DModel.from_config(
                    FluxTransformer2DModel.load_config(model_path / "transformer")
                )
                text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(model_path / "text_encoder"))
            except (OSError, ValueError) as exc:
                raise ProfileError(f"could not read the model architecture in {model_path}: {exc}") from exc
        elif spec.builtin is not None:
            transformer = FluxTransformer2DModel(**spec.builtin.transformer)
            text_encoder = CLIPTextModel(builtin.clip_config(spec.builtin))
        else:
            return None
    return LayerModels(transformer=transformer, text_encoder=text_encoder)


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
        pipe = _load_directory(options.model_path, dtype, spec.pipeline_class)
    elif spec.builtin is not None:
        pipe = builtin.build_pipeline(spec.builtin, spec.pipeline_class)
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


def _load_directory(path: Path, dtype: torch.dtype, pipeline_class: type) -> FluxPipeline:
    if not path.is_dir():
        raise ProfileError(f"model directory {path} does not exist")
    if not (path / "model_index.json").is_file():
        raise ProfileError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    # Library progress bars would interleave with our own output (and break --json on stderr+stdout).
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        pipe = pipeline_class.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ProfileError(f"could not load a {pipeline_class.__name__} from {path}: {exc}") from exc
    if pipeline_class is FluxFillPipeline:
        _check_fill_transformer(pipe, path)
    # safetensors memory-maps tensors at unaligned addresses and MKL picks different kernels
    # for them; fresh copies make loaded weights compute exactly like built ones.
    for module in _modules(pipe):
        realign_parameters(module)
    return pipe


def fill_in_channels(pipe: FluxPipeline) -> int:
    """The transformer input width FLUX.1 Fill needs: the packed noise latents, the packed latents
    of the masked image, and the packed mask (one channel per image pixel of a 2x2 latent patch)."""
    latent = pipe.vae.config.latent_channels * 4
    return latent + latent + pipe.vae_scale_factor**2 * 4


def _check_fill_transformer(pipe: FluxPipeline, path: Path) -> None:
    # A text-to-image FLUX.1 directory loads as a FluxFillPipeline without complaint and only
    # fails inside the first request; refuse it here with the reason.
    expected, found = fill_in_channels(pipe), pipe.transformer.config.in_channels
    if found != expected:
        raise ProfileError(
            f"{path} is not a FLUX.1 Fill model: its transformer takes {found} input channels, "
            f"Fill needs {expected} (noise, masked image and mask latents)"
        )


def save_pipeline(pipe: FluxPipeline, profile: str, directory: Path) -> None:
    """Write the pipeline in diffusers layout (loadable by stock diffusers as the pipeline's own
    class: FluxPipeline, FluxKontextPipeline...) plus a profile marker. Refuses a pipeline with
    LoRA adapters loaded: their layers would be saved in place of the base weights, and the
    directory would not load."""
    adapted = [type(m).__name__ for m in _modules(pipe) if getattr(m, "peft_config", None)]
    if adapted:
        raise ProfileError(f"save a pipeline without LoRA adapters loaded (found some in {', '.join(adapted)})")
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory, safe_serialization=True)
    (directory / PROFILE_MARKER).write_text(json.dumps({"profile": profile}, indent=2) + "\n")


def _modules(pipe: FluxPipeline) -> list[torch.nn.Module]:
    return [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae]
