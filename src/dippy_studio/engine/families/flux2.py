"""FLUX.2: the FLUX.2 transformer; [klein] with a Qwen3 text encoder, [dev] with Mistral 3.

Text-to-image and edit both run `Flux2KleinPipeline` (an edit passes the input image as the
reference image it conditions on). The base [klein] models are not guidance-distilled: guidance
above 1 adds a pass on an empty prompt; a distilled checkpoint (`is_distilled` in its pipeline
config) ignores it. LoRAs apply through PEFT to the transformer, as
`Flux2KleinPipeline.load_lora_weights` does; LoRA training stays with FLUX.1.

FLUX.2 [dev] (profiles `tiny-flux2-dev`, `flux2-dev`) runs `Flux2Pipeline` for both tasks, the
same way (an edit's input image is the reference image). Its text encoder is a Mistral 3
vision-language model reached through a Pixtral processor (`flux2_mistral`); the prompt alone is
encoded (the pipeline shows the encoder the image only to rewrite prompts, which the engine does
not ask for). [dev] is guidance-distilled: guidance is an input of the transformer, one pass.

`tiny-flux2` is FLUX.2 [klein]'s architecture at toy sizes (after diffusers' own test
components): 1 double and 1 single block, the `AutoencoderKLFlux2` at 2 levels, and a
`Qwen3ForCausalLM` of width 16 with 27 layers, so the pipeline's default
`text_encoder_out_layers` (9, 18, 27) exist and stock diffusers runs it with its defaults.
Stand-in: the real tokenizer is a download, so the built-in uses `tokenizers.qwen_tokenizer`
(byte-level, Qwen's chat tokens and template). Weights are seeded like every built-in.

`tiny-flux2-dev` is the same transformer with guidance embedding and the same VAE, and a
`Mistral3ForConditionalGeneration` of width 16 with 30 text layers (Flux2Pipeline's default
`text_encoder_out_layers` are 10, 20, 30). Stand-ins for the tokenizer and the processor: see
`flux2_mistral`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from PIL import Image
from transformers import Qwen3Config, Qwen3ForCausalLM

from dippy_studio.engine.builtin import FLUX_SCHEDULER, seed_modules
from dippy_studio.engine.families.base import Family, transformer_layer_models
from dippy_studio.engine.families.flux2_mistral import text_encoder, text_processor
from dippy_studio.engine.lora import LayerModels, LoraFormat
from dippy_studio.engine.tokenizers import qwen_tokenizer

if TYPE_CHECKING:
    from dippy_studio.engine.inputs import TaskImages

# Flux2KleinPipeline stacks these hidden states of its text encoder (its default).
TEXT_LAYERS = (9, 18, 27)
# Flux2Pipeline ([dev]) stacks these (its default).
DEV_TEXT_LAYERS = (10, 20, 30)


@dataclass(frozen=True)
class Flux2BuiltinConfig:
    """Architecture sizes of a built-in FLUX.2 [klein] pipeline; the seed decides the weights."""

    seed: int
    max_sequence_length: int
    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_width: int
    text_layers: int
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(FLUX_SCHEDULER))


TINY_FLUX2 = Flux2BuiltinConfig(
    seed=20261210,
    max_sequence_length=64,
    transformer=dict(
        patch_size=1,
        in_channels=16,  # 4 latent channels patchified 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        # The three stacked text layers side by side: 3 x 16.
        joint_attention_dim=3 * 16,
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    ),
    vae=dict(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    text_width=16,
    text_layers=max(TEXT_LAYERS),
)
TINY_FLUX2_DEV = replace(
    TINY_FLUX2,
    seed=20261212,
    # Room for the prompt after the pipeline's system message, one byte a token (`flux2_mistral`).
    max_sequence_length=512,
    transformer=dict(TINY_FLUX2.transformer, guidance_embeds=True),
    text_layers=max(DEV_TEXT_LAYERS),
)


def build_pipeline(config: Flux2BuiltinConfig, pipeline_class: type = Flux2KleinPipeline) -> Any:
    """Build `pipeline_class` (Flux2KleinPipeline, or Flux2Pipeline for [dev]) from `config` with
    seeded weights, in eval mode, float32 on CPU."""
    transformer = Flux2Transformer2DModel(**config.transformer)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, **config.vae)
    if pipeline_class is Flux2Pipeline:
        # [dev]: the pipeline's `tokenizer` is the processor.
        tokenizer: Any = text_processor(config.max_sequence_length)
        encoder: Any = text_encoder(config.text_width, config.text_layers, tokenizer.tokenizer)
    else:
        tokenizer = qwen_tokenizer(config.max_sequence_length)
        encoder = _qwen3(config, tokenizer)
    seed_modules({"transformer": transformer, "vae": vae, "text_encoder": encoder}, config.seed)
    return pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(**config.scheduler),
        vae=vae,
        text_encoder=encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _qwen3(config: Flux2BuiltinConfig, tokenizer: Any) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=config.text_width,
            intermediate_size=config.text_width * 2,
            num_hidden_layers=config.text_layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=config.text_width // 2,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
    )


FLUX2_LORA = LoraFormat(label="FLUX.2", loader=Flux2KleinPipeline, components=("transformer",))


class Flux2Family(Family):
    name = "flux2"
    default_class = Flux2KleinPipeline
    profile_classes: ClassVar[Mapping[str, type]] = {"tiny-flux2-dev": Flux2Pipeline, "flux2-dev": Flux2Pipeline}
    task_classes: ClassVar[Mapping[str, type]] = {"generate": Flux2KleinPipeline, "edit": Flux2KleinPipeline}
    model_components = ("transformer", "text_encoder", "vae")
    lora_format = FLUX2_LORA
    trains_loras = False

    def build(self, config: Flux2BuiltinConfig, pipeline_class: type) -> Any:
        return build_pipeline(config, pipeline_class)

    def task_class(self, pipe: Any, task: str) -> type:
        if isinstance(pipe, Flux2Pipeline) and task in self.task_classes:
            return Flux2Pipeline  # [dev]: one pipeline for text-to-image and reference editing
        return super().task_class(pipe, task)

    def layer_models(self, config: Flux2BuiltinConfig | None, model_path: Path | None) -> LayerModels | None:
        return transformer_layer_models(Flux2Transformer2DModel, config, model_path, FLUX2_LORA)

    def encode_prompt(self, pipe: Any, prompt: str, guidance: float, max_sequence_length: int) -> dict[str, Any]:
        device = pipe.transformer.device
        embeds, _ = pipe.encode_prompt(prompt=prompt, device=device, max_sequence_length=max_sequence_length)
        text: dict[str, Any] = {"prompt_embeds": embeds}
        if isinstance(pipe, Flux2Pipeline):
            return text  # guidance-distilled: guidance goes into the transformer, no second pass
        # As Flux2KleinPipeline decides it: an empty negative prompt, unless distilled.
        if guidance > 1 and not pipe.config.is_distilled:
            negative, _ = pipe.encode_prompt(prompt="", device=device, max_sequence_length=max_sequence_length)
            text["negative_prompt_embeds"] = negative
        return text

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
        if images is not None:
            # The reference image, already at the output size (a multiple of 16).
            arguments["image"] = images.image
        return arguments

    def decode(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> Image.Image:
        # Flux2KleinPipeline unpacks and denormalises before it returns latents; what is left of
        # its output_type="pil" path is the VAE and the postprocessing. Flux2Pipeline returns
        # them packed: first the rest of its path (the same arithmetic).
        if isinstance(pipe, Flux2Pipeline):
            latents = _unpack_dev_latents(pipe, latents, height, width)
        image = pipe.vae.decode(latents.to(pipe.vae.device), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]

    def denoising_steps(self, steps: int, strength: float) -> int:
        return steps  # no img2img or inpainting pipeline: every step runs


def _unpack_dev_latents(pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Flux2Pipeline's packed latents as the VAE takes them, as its output_type="pil" path does."""
    side = pipe.vae_scale_factor * 2
    grid = torch.empty(latents.shape[0], 1, height // side, width // side)  # only its shape is read
    latents = pipe._unpack_latents_with_ids(latents, pipe._prepare_latent_ids(grid).to(latents.device))
    bn = pipe.vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(
        latents.device, latents.dtype
    )
    return pipe._unpatchify_latents(latents * std + mean)


FLUX2 = Flux2Family()
