"""Synthetic LoRAs for the built-in profiles: seeded random adapters in diffusers format.

Used by the demo, the benchmarks and the tests, where no trained LoRA exists yet. The file
is written by stock `save_lora_weights` (`FluxPipeline.save_lora_weights` for FLUX.1), the
format trainers produce.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import FluxPipeline
from diffusers.loaders import FluxLoraLoaderMixin

from dippy_studio.protocol.limits import DEFAULT_TARGETS


def random_lora_state_dict(
    transformer: torch.nn.Module,
    seed: int,
    rank: int = 4,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    strength: float = 0.5,
) -> dict[str, torch.Tensor]:
    """PEFT-style `lora_A`/`lora_B` tensors for every Linear whose name ends with a target."""
    generator = torch.Generator("cpu").manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in sorted(transformer.named_modules()):
        module = getattr(module, "base_layer", module)
        if not isinstance(module, torch.nn.Linear) or ".lora_" in name or "base_layer" in name:
            continue
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        a = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
        b = torch.randn(module.out_features, rank, generator=generator) * strength / rank**0.5
        state[f"{name}.lora_A.weight"] = a.contiguous()
        state[f"{name}.lora_B.weight"] = b.contiguous()
    return state


def write_random_lora(pipe: FluxPipeline, path: Path, seed: int, rank: int = 4, strength: float = 0.5) -> Path:
    """Write a seeded random LoRA for `pipe`'s denoiser (its transformer, or an SDXL UNet) to
    `path` (.safetensors), saved by the pipeline family's own `save_lora_weights`."""
    denoiser = "unet" if hasattr(pipe, "unet") else "transformer"
    layers = random_lora_state_dict(getattr(pipe, denoiser), seed=seed, rank=rank, strength=strength)
    # Every FLUX.1 pipeline (Kontext, Fill...) writes LoRAs as FluxPipeline does.
    loader = FluxPipeline if isinstance(pipe, FluxLoraLoaderMixin) else type(pipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        loader.save_lora_weights(tmp, weight_name="lora.safetensors", **{f"{denoiser}_lora_layers": layers})
        Path(tmp, "lora.safetensors").replace(path)
    return path
