"""FLUX.1: dev, schnell, Kontext (edit) and Fill (inpaint), plus the built-in tiny profiles.

Text-to-image runs `FluxPipeline`, edit `FluxKontextPipeline`, img2img `FluxImg2ImgPipeline`,
inpaint `FluxInpaintPipeline` (`FluxFillPipeline` on a Fill profile). The built-ins
(`engine.builtin`) are FLUX.1's architecture at toy sizes with seeded weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import (
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from dippy_studio.engine import builtin
from dippy_studio.engine.errors import ProfileError
from dippy_studio.engine.families.base import Family
from dippy_studio.engine.lora import FLUX_LORA, LayerModels

if TYPE_CHECKING:
    from dippy_studio.engine.inputs import TaskImages


class FluxFamily(Family):
    name = "flux"
    default_class = FluxPipeline
    profile_classes: ClassVar[Mapping[str, type]] = {
        "tiny-kontext": FluxKontextPipeline,
        "flux-kontext": FluxKontextPipeline,
        "flux-fill": FluxFillPipeline,
    }
    task_classes: ClassVar[Mapping[str, type]] = {
        "generate": FluxPipeline,
        "edit": FluxKontextPipeline,
        "img2img": FluxImg2ImgPipeline,
        "inpaint": FluxInpaintPipeline,
    }
    model_components = ("transformer", "text_encoder", "text_encoder_2", "vae")
    lora_format = FLUX_LORA
    trains_loras = True

    def task_class(self, pipe: Any, task: str) -> type:
        # A Fill model inpaints through its own pipeline (its transformer takes the mask).
        if task == "inpaint" and isinstance(pipe, FluxFillPipeline):
            return FluxFillPipeline
        return super().task_class(pipe, task)

    def check_loaded(self, pipe: Any, path: Path) -> None:
        # A text-to-image FLUX.1 directory loads as a FluxFillPipeline without complaint and only
        # fails inside the first request; refuse it here with the reason.
        if not isinstance(pipe, FluxFillPipeline):
            return
        expected, found = fill_in_channels(pipe), pipe.transformer.config.in_channels
        if found != expected:
            raise ProfileError(
                f"{path} is not a FLUX.1 Fill model: its transformer takes {found} input channels, "
                f"Fill needs {expected} (noise, masked image and mask latents)"
            )

    def build(self, config: builtin.BuiltinConfig, pipeline_class: type) -> FluxPipeline:
        return builtin.build_pipeline(config, pipeline_class)

    def layer_models(self, config: builtin.BuiltinConfig | None, model_path: Path | None) -> LayerModels | None:
        with torch.device("meta"):
            if model_path is not None:
                try:
                    transformer = FluxTransformer2DModel.from_config(
                        FluxTransformer2DModel.load_config(model_path / "transformer")
                    )
                    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(model_path / "text_encoder"))
                except (OSError, ValueError) as exc:
                    raise ProfileError(f"could not read the model architecture in {model_path}: {exc}") from exc
            elif config is not None:
                transformer = FluxTransformer2DModel(**config.transformer)
                text_encoder = CLIPTextModel(builtin.clip_config(config))
            else:
                return None
        return LayerModels({"transformer": transformer, "text_encoder": text_encoder})

    def encode_prompt(self, pipe: Any, prompt: str, guidance: float, max_sequence_length: int) -> dict[str, Any]:
        # Guidance is distilled into FLUX.1 (an input of the transformer): one prompt, no negative.
        prompt_embeds, pooled_embeds, _ = pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            device=pipe.transformer.device,
            max_sequence_length=max_sequence_length,
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_embeds}

    def call_arguments(
        self,
        task: str,
        images: TaskImages | None,
        strength: float,
        width: int,
        height: int,
        max_sequence_length: int,
        guidance: float,
    ) -> dict[str, Any]:
        arguments: dict[str, Any] = {"height": height, "width": width, "max_sequence_length": max_sequence_length}
        if images is None:
            return arguments
        if task == "edit":
            # Kontext otherwise rescales the output to max_area (1024^2) and the input to its
            # preferred resolutions: both would ignore the requested size.
            return {**arguments, "image": images.image, "max_area": width * height, "_auto_resize": False}
        arguments.update(image=images.image, strength=strength)
        if images.mask is not None:
            arguments["mask_image"] = images.mask
        return arguments

    def decode(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> Image.Image:
        # The same arithmetic as FluxPipeline.__call__ with output_type="pil".
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents.to(pipe.vae.device), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]

    def denoising_steps(self, steps: int, strength: float) -> int:
        # FluxImg2ImgPipeline.get_timesteps: the last `strength` of the schedule.
        return steps - int(max(steps - steps * strength, 0))


def fill_in_channels(pipe: FluxPipeline) -> int:
    """The transformer input width FLUX.1 Fill needs: the packed noise latents, the packed latents
    of the masked image, and the packed mask (one channel per image pixel of a 2x2 latent patch)."""
    latent = pipe.vae.config.latent_channels * 4
    return latent + latent + pipe.vae_scale_factor**2 * 4


FLUX = FluxFamily()
