"""Stable Diffusion XL: a UNet denoiser with two CLIP text encoders and classifier-free guidance.

Text-to-image runs `StableDiffusionXLPipeline`, img2img `StableDiffusionXLImg2ImgPipeline`,
inpaint `StableDiffusionXLInpaintPipeline` (a plain 4-channel UNet: the pipeline blends the kept
region back at every step). SDXL has no instruction editing. LoRAs apply through PEFT to the
UNet and both text encoders, as `StableDiffusionXLPipeline.load_lora_weights` does; LoRA
training stays with the Flux family.

`tiny-sdxl` is SDXL's architecture at toy sizes (after diffusers' own SDXL test components):
a 2-level UNet with the "text_time" added conditioning, a 2-level VAE, `CLIPTextModel` and
`CLIPTextModelWithProjection` over the same offline byte-level CLIP tokenizer as the Flux
built-ins, and SDXL's Euler scheduler settings. Weights are seeded like every built-in
(`builtin.seed_weights`), so every machine builds the same bits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from dippy_studio.engine.builtin import seed_modules
from dippy_studio.engine.errors import ProfileError
from dippy_studio.engine.families.base import Family
from dippy_studio.engine.lora import LayerModels, LoraFormat
from dippy_studio.engine.tokenizers import clip_tokenizer

if TYPE_CHECKING:
    from dippy_studio.engine.inputs import TaskImages

# SDXL 1.0 base's scheduler (its scheduler_config.json, minus the bookkeeping keys).
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    steps_offset=1,
    timestep_spacing="leading",
    use_karras_sigmas=False,
)


@dataclass(frozen=True)
class SdxlBuiltinConfig:
    """Architecture sizes of a built-in SDXL pipeline; the seed decides the weights."""

    seed: int
    unet: dict[str, Any]
    vae: dict[str, Any]
    clip_width: int
    clip_layers: int
    # CLIP's context: SDXL pads every prompt to the tokenizers' model_max_length.
    max_sequence_length: int = 77
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SDXL_SCHEDULER))


TINY_SDXL = SdxlBuiltinConfig(
    seed=20261207,
    unet=dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        # UNet2DConditionModel's historical name: the number of heads per block.
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        # 6 size/crop conditioning values of 8 dims each, plus the pooled text embedding (32).
        projection_class_embeddings_input_dim=6 * 8 + 32,
        # The two encoders' hidden states side by side: 32 + 32.
        cross_attention_dim=64,
        norm_num_groups=8,
    ),
    vae=dict(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    ),
    clip_width=32,
    clip_layers=2,
)


def clip_config(config: SdxlBuiltinConfig, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=config.clip_width,
        intermediate_size=config.clip_width * 4,
        num_attention_heads=4,
        # SDXL reads the penultimate layer's hidden states: at least two layers.
        num_hidden_layers=config.clip_layers,
        projection_dim=config.clip_width,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",
    )


def build_pipeline(config: SdxlBuiltinConfig, pipeline_class: type = StableDiffusionXLPipeline) -> Any:
    """Build `pipeline_class` (an SDXL pipeline) from `config` with seeded weights, in eval mode,
    float32 on CPU."""
    tokenizer = clip_tokenizer(config.max_sequence_length)
    tokenizer_2 = clip_tokenizer(config.max_sequence_length)
    unet = UNet2DConditionModel(**config.unet)
    vae = AutoencoderKL(in_channels=3, out_channels=3, scaling_factor=0.13025, **config.vae)
    text_encoder = CLIPTextModel(clip_config(config, tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(config, tokenizer_2))
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    seed_modules(modules, config.seed)
    return pipeline_class(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**config.scheduler),
        # No invisible watermark: it is an optional package, and stock loading of the saved
        # directory decides the same way when it is absent.
        add_watermarker=False,
    )


SDXL_LORA = LoraFormat(
    label="SDXL", loader=StableDiffusionXLPipeline, components=("unet", "text_encoder", "text_encoder_2")
)


class SdxlFamily(Family):
    name = "sdxl"
    default_class = StableDiffusionXLPipeline
    task_classes: ClassVar[Mapping[str, type]] = {
        "generate": StableDiffusionXLPipeline,
        "img2img": StableDiffusionXLImg2ImgPipeline,
        "inpaint": StableDiffusionXLInpaintPipeline,
    }
    model_components = ("unet", "text_encoder", "text_encoder_2", "vae")
    lora_format = SDXL_LORA
    trains_loras = False

    def build(self, config: SdxlBuiltinConfig, pipeline_class: type) -> Any:
        return build_pipeline(config, pipeline_class)

    def check_loaded(self, pipe: Any, path: Path) -> None:
        if pipe.unet.config.in_channels != pipe.vae.config.latent_channels:
            raise ProfileError(
                f"{path}: its UNet takes {pipe.unet.config.in_channels} input channels and its VAE makes "
                f"{pipe.vae.config.latent_channels}; an SDXL inpainting UNet (9 channels) is not served"
            )

    def layer_models(self, config: SdxlBuiltinConfig | None, model_path: Path | None) -> LayerModels | None:
        with torch.device("meta"):
            if model_path is not None:
                try:
                    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_path / "unet"))
                    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(model_path / "text_encoder"))
                    text_encoder_2 = CLIPTextModelWithProjection(
                        CLIPTextConfig.from_pretrained(model_path / "text_encoder_2")
                    )
                except (OSError, ValueError) as exc:
                    raise ProfileError(f"could not read the model architecture in {model_path}: {exc}") from exc
            elif config is not None:
                tokenizer = clip_tokenizer(config.max_sequence_length)
                unet = UNet2DConditionModel(**config.unet)
                text_encoder = CLIPTextModel(clip_config(config, tokenizer))
                text_encoder_2 = CLIPTextModelWithProjection(clip_config(config, tokenizer))
            else:
                return None
        models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
        return LayerModels(models, SDXL_LORA)

    def encode_prompt(self, pipe: Any, prompt: str, guidance: float, max_sequence_length: int) -> dict[str, Any]:
        # As the pipelines decide it: guidance above 1 runs the UNet on an empty negative prompt
        # too (zeros, `force_zeros_for_empty_prompt`), so its embeddings are made here as well.
        guided = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt, device=pipe.unet.device, num_images_per_prompt=1, do_classifier_free_guidance=guided
        )
        return {
            "prompt_embeds": embeds,
            "negative_prompt_embeds": negative,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
        }

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
        if images is None:
            return {"height": height, "width": width}
        if task == "img2img":
            # The img2img pipeline takes its size from the input image (already resized to it).
            return {"image": images.image, "strength": strength}
        return {
            "image": images.image,
            "mask_image": images.mask,
            "strength": strength,
            "height": height,
            "width": width,
        }

    def decode(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> Image.Image:
        # The same arithmetic as the SDXL pipelines' __call__ with output_type="pil". A float16
        # VAE is upcast there; the engine runs float32 or bfloat16, where it is not.
        vae = pipe.vae
        if vae.dtype == torch.float16 and vae.config.force_upcast:
            raise ProfileError("float16 SDXL VAEs are not served: run the profile in float32 or bfloat16")
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents.to(vae.device), return_dict=False)[0]
        if pipe.watermark is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type="pil")[0]

    def denoising_steps(self, steps: int, strength: float) -> int:
        # StableDiffusionXLImg2ImgPipeline.get_timesteps (no denoising_start).
        return min(int(steps * strength), steps)


SDXL = SdxlFamily()
