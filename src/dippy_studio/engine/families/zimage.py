"""Z-Image: a single-stream DiT whose captions come from a Qwen3 language model.

Text-to-image runs `ZImagePipeline`, img2img `ZImageImg2ImgPipeline`, inpaint
`ZImageInpaintPipeline`. Guidance is classifier-free (a second pass on an empty prompt) for any
guidance above 0; Z-Image-Turbo runs with 0. LoRAs apply through PEFT to the transformer, as
`ZImagePipeline.load_lora_weights` does; LoRA training stays with the Flux family.

`tiny-zimage` is Z-Image's architecture at toy sizes (after diffusers' own Z-Image test
components): a 2-layer transformer with one refiner layer per stream, a 2-level VAE with 16
latent channels, and a 2-layer `Qwen3Model`. Stand-in: the real tokenizer (Qwen2Tokenizer with
151k merged tokens) is a download, so the built-in uses `tokenizers.qwen_tokenizer`, the same
class over bytes with Qwen's chat tokens and chat template (the pipeline wraps every prompt in
it). Weights are seeded like every built-in (`builtin.seed_weights`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    ZImageImg2ImgPipeline,
    ZImageInpaintPipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from PIL import Image
from transformers import Qwen3Config, Qwen3Model

from dippy_studio.engine.builtin import seed_modules
from dippy_studio.engine.families.base import Family, transformer_layer_models
from dippy_studio.engine.lora import LayerModels, LoraFormat
from dippy_studio.engine.tokenizers import qwen_tokenizer

if TYPE_CHECKING:
    from dippy_studio.engine.inputs import TaskImages

# Z-Image-Turbo's scheduler: a fixed shift, no resolution-dependent one.
ZIMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


@dataclass(frozen=True)
class ZImageBuiltinConfig:
    """Architecture sizes of a built-in Z-Image pipeline; the seed decides the weights."""

    seed: int
    max_sequence_length: int
    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_width: int
    text_layers: int
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(ZIMAGE_SCHEDULER))


TINY_ZIMAGE = ZImageBuiltinConfig(
    seed=20261208,
    max_sequence_length=64,
    transformer=dict(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=32,
        rope_theta=256.0,
        t_scale=1000.0,
        # Head dim 16 split over (caption/frame, height, width) positions; the lengths bound the
        # positions: 64 patches a side covers 256 pixels with a 2x VAE and 2x2 patches.
        axes_dims=(8, 4, 4),
        axes_lens=(512, 64, 64),
    ),
    vae=dict(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ),
    text_width=32,
    text_layers=2,
)


def qwen3_config(config: ZImageBuiltinConfig, vocab_size: int, pad_token_id: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=config.text_width,
        intermediate_size=config.text_width * 2,
        # Z-Image reads the penultimate layer's hidden states: at least two layers.
        num_hidden_layers=config.text_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=config.text_width // 2,
        max_position_embeddings=512,
        pad_token_id=pad_token_id,
    )


def build_pipeline(config: ZImageBuiltinConfig, pipeline_class: type = ZImagePipeline) -> Any:
    """Build `pipeline_class` (a Z-Image pipeline) from `config` with seeded weights, in eval
    mode, float32 on CPU."""
    tokenizer = qwen_tokenizer(config.max_sequence_length)
    transformer = ZImageTransformer2DModel(**config.transformer)
    vae = AutoencoderKL(in_channels=3, out_channels=3, **config.vae)
    text_encoder = Qwen3Model(qwen3_config(config, len(tokenizer), tokenizer.pad_token_id))
    seed_modules({"transformer": transformer, "vae": vae, "text_encoder": text_encoder}, config.seed)
    return pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(**config.scheduler),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


ZIMAGE_LORA = LoraFormat(label="Z-Image", loader=ZImagePipeline, components=("transformer",))


class ZImageFamily(Family):
    name = "zimage"
    default_class = ZImagePipeline
    task_classes: ClassVar[Mapping[str, type]] = {
        "generate": ZImagePipeline,
        "img2img": ZImageImg2ImgPipeline,
        "inpaint": ZImageInpaintPipeline,
    }
    model_components = ("transformer", "text_encoder", "vae")
    lora_format = ZIMAGE_LORA
    trains_loras = False

    def build(self, config: ZImageBuiltinConfig, pipeline_class: type) -> Any:
        return build_pipeline(config, pipeline_class)

    def layer_models(self, config: ZImageBuiltinConfig | None, model_path: Path | None) -> LayerModels | None:
        return transformer_layer_models(ZImageTransformer2DModel, config, model_path, ZIMAGE_LORA)

    def encode_prompt(self, pipe: Any, prompt: str, guidance: float, max_sequence_length: int) -> dict[str, Any]:
        # As ZImagePipeline decides it: any guidance above 0 adds a pass on an empty prompt.
        embeds, negative = pipe.encode_prompt(
            prompt=prompt,
            device=pipe.transformer.device,
            do_classifier_free_guidance=guidance > 0,
            max_sequence_length=max_sequence_length,
        )
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}

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
        arguments.update(image=images.image, strength=strength)
        if images.mask is not None:
            arguments["mask_image"] = images.mask
        return arguments

    def decode(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> Image.Image:
        # The same arithmetic as ZImagePipeline.__call__ with output_type="pil".
        latents = latents.to(pipe.vae.dtype)
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]

    def denoising_steps(self, steps: int, strength: float) -> int:
        # ZImageImg2ImgPipeline.get_timesteps.
        return steps - int(max(steps - min(steps * strength, steps), 0))


ZIMAGE = ZImageFamily()
