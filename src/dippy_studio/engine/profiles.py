"""Model profiles: what a profile is, how its pipeline is built or loaded, and how it is saved.

A profile fixes everything that decides output bits besides the request: weights, dtype,
device, thread count, sequence length, LoRA application mode. `EngineOptions` picks one and
says where its weights come from; `load_pipeline` turns that into a ready pipeline of the
profile's class (decided by its model family, `engine.families`: FluxPipeline, or
FluxKontextPipeline for the Kontext profiles, StableDiffusionXLPipeline for SDXL...), the class
its saved directory records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from dippy_studio.engine import builtin
from dippy_studio.engine.attention import apply_attention_backend
from dippy_studio.engine.construction import CONSTRUCTION
from dippy_studio.engine.determinism import configure_cuda, configure_threads, realign_parameters
from dippy_studio.engine.errors import ProfileError
from dippy_studio.engine.families import Family, get_family
from dippy_studio.engine.families.flux import fill_in_channels as fill_in_channels  # re-exported
from dippy_studio.engine.families.flux2 import TINY_FLUX2, TINY_FLUX2_DEV
from dippy_studio.engine.families.qwen_image import TINY_QWEN_IMAGE, TINY_QWEN_IMAGE_EDIT
from dippy_studio.engine.families.sdxl import TINY_SDXL
from dippy_studio.engine.families.zimage import TINY_ZIMAGE
from dippy_studio.engine.lora import LayerModels
from dippy_studio.engine.options import EngineOptions
from dippy_studio.protocol.limits import PROFILE_LIMITS, ProfileLimits

PROFILE_MARKER = "dippy_profile.json"
# One LoRA application mode per profile: PEFT layers computed beside the frozen base weights.
# Fusing into the weights differs in the last bits and would make removal lossy.
LORA_MODE = "peft-unfused"


# Built from the lightweight table in protocol.limits (which the orchestrator reads without
# loading torch) plus, for the built-ins, the architecture that builds their weights (a config
# of the profile's family: `builtin.BuiltinConfig` for Flux).
_BUILTINS: dict[str, Any] = {
    "tiny": builtin.TINY,
    "tiny-kontext": builtin.TINY_KONTEXT,
    "small": builtin.SMALL,
    "toy": builtin.TOY,
    "tiny-sdxl": TINY_SDXL,
    "tiny-zimage": TINY_ZIMAGE,
    "tiny-qwen-image": TINY_QWEN_IMAGE,
    "tiny-qwen-image-edit": TINY_QWEN_IMAGE_EDIT,
    "tiny-flux2": TINY_FLUX2,
    "tiny-flux2-dev": TINY_FLUX2_DEV,
}


@dataclass(frozen=True)
class ProfileSpec(ProfileLimits):
    """A profile's request limits plus where its weights come from: a built-in architecture,
    or (None) a local diffusers-layout directory. The pipeline class is the family's choice
    for the profile; the engine builds the other tasks' pipelines from the same components."""

    builtin: Any = None
    pipeline_class: type = FluxPipeline

    @property
    def model_family(self) -> Family:
        return get_family(self.family)


def _spec(limits: ProfileLimits) -> ProfileSpec:
    return ProfileSpec(
        **{f.name: getattr(limits, f.name) for f in fields(limits)},
        builtin=_BUILTINS.get(limits.name),
        pipeline_class=get_family(limits.family).pipeline_class(limits.name),
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
    """The models a LoRA may adapt (Flux: the transformer and the CLIP text encoder) on the meta
    device: every layer's name and shape, no weights, built in a fraction of a second even for
    FLUX.1. What a LoRA is checked against (`lora.lora_fit_problem`, with the family's
    `lora_format`) where no model is loaded. The architecture comes from the model directory
    when given, else from the built-in profile; None when neither is known."""
    spec = get_profile(profile)
    return spec.model_family.layer_models(spec.builtin, model_path)


def load_pipeline(options: EngineOptions) -> FluxPipeline:
    """Build or load the profile's pipeline, ready for deterministic inference."""
    spec = get_profile(options.profile)
    configure_threads(options.threads)
    if options.device == "cuda" and not torch.cuda.is_available():
        raise ProfileError("device 'cuda' was asked for but torch sees no CUDA device")
    if options.device == "cuda":
        configure_cuda()
    dtype = DTYPES[options.run_dtype]
    family = spec.model_family
    if options.model_path is None and spec.builtin is None:
        raise ProfileError(
            f"profile {spec.name!r} loads from a local diffusers-layout directory: pass --model-path DIR "
            "(nothing is ever downloaded)"
        )
    with CONSTRUCTION:
        if options.model_path is not None:
            pipe = _load_directory(options.model_path, dtype, spec.pipeline_class, family)
        else:
            pipe = family.build(spec.builtin, spec.pipeline_class)
        denoiser = getattr(pipe, family.denoiser)
        if denoiser.dtype != dtype:
            pipe.to(dtype=dtype)
        pipe.to(options.device)
        for module in family.modules(pipe):
            module.eval()
            module.requires_grad_(False)
        # Before compiling: the compiled graph captures the attention kernel.
        apply_attention_backend(denoiser, options.attention_backend)
        if options.compile:
            denoiser.compile()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_directory(path: Path, dtype: torch.dtype, pipeline_class: type, family: Family) -> Any:
    if not path.is_dir():
        raise ProfileError(f"model directory {path} does not exist")
    if not (path / "model_index.json").is_file():
        raise ProfileError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    # Library progress bars would interleave with our own output (and break --json on stderr+stdout).
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # ImportError/AttributeError: a component class the directory names that cannot be built here
    # (transformers' Qwen2-VL processor needs torchvision, which is not installed beside our torch).
    try:
        pipe = pipeline_class.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError, ImportError, AttributeError) as exc:
        raise ProfileError(f"could not load a {pipeline_class.__name__} from {path}: {exc}") from exc
    family.check_loaded(pipe, path)
    # safetensors memory-maps tensors at unaligned addresses and MKL picks different kernels
    # for them; fresh copies make loaded weights compute exactly like built ones.
    for module in family.modules(pipe):
        realign_parameters(module)
    return pipe


def save_pipeline(pipe: FluxPipeline, profile: str, directory: Path) -> None:
    """Write the pipeline in diffusers layout (loadable by stock diffusers as the pipeline's own
    class: FluxPipeline, FluxKontextPipeline, StableDiffusionXLPipeline...) plus a profile
    marker. Refuses a pipeline with LoRA adapters loaded: their layers would be saved in place of
    the base weights, and the directory would not load."""
    adapted = [type(m).__name__ for m in _modules(pipe) if getattr(m, "peft_config", None)]
    if adapted:
        raise ProfileError(f"save a pipeline without LoRA adapters loaded (found some in {', '.join(adapted)})")
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory, safe_serialization=True)
    (directory / PROFILE_MARKER).write_text(json.dumps({"profile": profile}, indent=2) + "\n")


def _modules(pipe: Any) -> list[torch.nn.Module]:
    """Every torch model of the pipeline, whatever its family."""
    return [part for part in pipe.components.values() if isinstance(part, torch.nn.Module)]
