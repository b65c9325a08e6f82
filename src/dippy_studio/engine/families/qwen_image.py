"""Qwen-Image: an MMDiT whose captions come from the Qwen2.5-VL language model.

Text-to-image runs `QwenImagePipeline`, img2img `QwenImageImg2ImgPipeline`, inpaint
`QwenImageInpaintPipeline`. Qwen-Image is not guidance-distilled: its guidance is "true"
classifier-free guidance (`true_cfg_scale`) against a negative prompt. The engine maps a
request's `guidance` to `true_cfg_scale` with the single-space negative prompt Qwen's own
examples use; at 1 or below there is no second pass. LoRAs apply through PEFT to the
transformer, as `QwenImagePipeline.load_lora_weights` does; LoRA training stays with Flux.

Qwen-Image-Edit (profiles `tiny-qwen-image-edit`, `qwen-image-edit`) runs `QwenImageEditPipeline`
for the `edit` task only: that pipeline needs an input image. Its text stage reads the image too
(Qwen2.5-VL sees it through the pipeline's `processor`), so for an edit the pipeline encodes the
prompt itself and the engine's text-encode timing is folded into denoising. The pipeline
resizes the input to about 1024x1024 for its VAE and vision tower whatever the output size.

`tiny-qwen-image` is Qwen-Image's architecture at toy sizes (after diffusers' own Qwen-Image
test components): a 2-layer transformer, the 3D causal `AutoencoderKLQwenImage` at 4 latent
channels, and a 2-layer `Qwen2_5_VLForConditionalGeneration` (its vision tower is built, as the
class requires, but never runs for text). Stand-in: the real tokenizer is a download, so the
built-in uses `tokenizers.qwen_tokenizer`, byte-level, plus merges that make the words of the
pipeline's fixed system prompt single tokens as in the real vocabulary: the pipeline drops that
prompt by count (its first 34 tokens), and with one token per byte it would keep most of it.
Weights are seeded like every built-in (`builtin.seed_weights`).

`tiny-qwen-image-edit` is the same at toy sizes with a 3-level VAE (8x downsampling, as the real
one: with 4x, the 1024x1024 input would be 16k latent tokens), and its Qwen2.5-VL vision tower
runs. Stand-in processor: transformers 5.x builds `Qwen2VLProcessor` only with its video
processor, which needs torchvision, and no torchvision installs beside the pinned CPU torch.
`QwenImageProcessor` is `Qwen2VLProcessor` minus video (the same image processing and the same
expansion of `<|image_pad|>` into one token per merged patch), with the PIL image processor at
one 56x56 image (4 vision tokens; the real one allows up to 12.8M pixels). Stock diffusers loads
a saved directory with it once this module is imported (model_index.json names its module). The
stand-in tokenizer also makes the edit pipeline's system prompt count its real 64 tokens. A real
Qwen-Image-Edit directory names `Qwen2VLProcessor` and so loads only where torchvision is
installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageImg2ImgPipeline,
    QwenImageInpaintPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from dippy_studio.engine.builtin import seed_modules
from dippy_studio.engine.families.base import Family, transformer_layer_models
from dippy_studio.engine.lora import LayerModels, LoraFormat
from dippy_studio.engine.tokenizers import qwen_tokenizer

if TYPE_CHECKING:
    from dippy_studio.engine.inputs import TaskImages

# Qwen-Image's scheduler config: a resolution-dependent shift, exponential time shifting.
QWEN_IMAGE_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    invert_sigmas=False,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    stochastic_sampling=False,
    time_shift_type="exponential",
    use_beta_sigmas=False,
    use_dynamic_shifting=True,
    use_exponential_sigmas=False,
    use_karras_sigmas=False,
)
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# The negative prompt of true classifier-free guidance (Qwen-Image's own examples use " ").
NEGATIVE_PROMPT = " "


@dataclass(frozen=True)
class QwenImageBuiltinConfig:
    """Architecture sizes of a built-in Qwen-Image pipeline; the seed decides the weights."""

    seed: int
    max_sequence_length: int
    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_width: int
    text_layers: int
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(QWEN_IMAGE_SCHEDULER))
    # The image area the edit pipeline's vision tower sees (its processor's fixed size).
    vision_pixels: int = 56 * 56


TINY_QWEN_IMAGE = QwenImageBuiltinConfig(
    seed=20261209,
    max_sequence_length=64,
    transformer=dict(
        patch_size=2,
        in_channels=16,  # 4 latent channels packed 2x2
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    ),
    vae=dict(
        base_dim=8,
        z_dim=4,
        # Lists, not tuples: the VAE concatenates them with lists.
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ),
    text_width=32,
    text_layers=2,
)
TINY_QWEN_IMAGE_EDIT = replace(
    TINY_QWEN_IMAGE,
    seed=20261211,
    vae=dict(TINY_QWEN_IMAGE.vae, base_dim=4, dim_mult=[1, 2, 2, 2], temperal_downsample=[False, True, True]),
)


# What QwenImagePipeline puts before every prompt (its `prompt_template_encode`), and drops
# again by count (`prompt_template_encode_start_idx`) after encoding.
SYSTEM_PROMPT = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)


# QwenImageEditPipeline's, dropped the same way (its first 64 tokens); the image follows it.
EDIT_SYSTEM_PROMPT = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
# Qwen2-VL's chat template for text and image messages (the pipeline formats its own prompt;
# this is for a user of the saved processor).
QWEN_VL_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def pipeline_tokenizer(model_max_length: int = 1024, whole_words: str = SYSTEM_PROMPT) -> Qwen2Tokenizer:
    """The built-in's tokenizer, on which `SYSTEM_PROMPT` counts the 34 tokens it has in the real
    one (and `EDIT_SYSTEM_PROMPT` its 64, when given in `whole_words`)."""
    return qwen_tokenizer(model_max_length, whole_words=whole_words, extra_special=VISION_TOKENS)


class QwenImageProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` for text and images only (no video processor, so no torchvision)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs):
        # What Qwen2VLProcessor.__init__ sets, then the generic init with no video processor.
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


def edit_processor(tokenizer: Qwen2Tokenizer, pixels: int) -> QwenImageProcessor:
    """The built-in edit pipeline's processor: Qwen2-VL's image processing (14-pixel patches,
    2x2 merges) at exactly `pixels` pixels."""
    images = Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=pixels, max_pixels=pixels
    )
    return QwenImageProcessor(image_processor=images, tokenizer=tokenizer, chat_template=QWEN_VL_CHAT_TEMPLATE)


def text_config(config: QwenImageBuiltinConfig, tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    vision = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
    head_dim = config.text_width // 2
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=config.text_width,
            intermediate_size=config.text_width * 2,
            num_hidden_layers=config.text_layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            # Multimodal RoPE splits half the head dim over (time, height, width).
            rope_scaling={"mrope_section": [head_dim // 8, head_dim // 8, head_dim // 4], "rope_type": "default"},
            rope_theta=1000000.0,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=config.text_width
        ),
        vision_start_token_id=vision[0],
        vision_end_token_id=vision[1],
        image_token_id=vision[2],
        video_token_id=vision[3],
    )


def build_pipeline(config: QwenImageBuiltinConfig, pipeline_class: type = QwenImagePipeline) -> Any:
    """Build `pipeline_class` (a Qwen-Image pipeline) from `config` with seeded weights, in eval
    mode, float32 on CPU."""
    edit = pipeline_class is QwenImageEditPipeline
    tokenizer = pipeline_tokenizer(whole_words=SYSTEM_PROMPT + EDIT_SYSTEM_PROMPT if edit else SYSTEM_PROMPT)
    transformer = QwenImageTransformer2DModel(**config.transformer)
    vae = AutoencoderKLQwenImage(**config.vae)
    text_encoder = Qwen2_5_VLForConditionalGeneration(text_config(config, tokenizer))
    seed_modules({"transformer": transformer, "vae": vae, "text_encoder": text_encoder}, config.seed)
    extra = {"processor": edit_processor(tokenizer, config.vision_pixels)} if edit else {}
    return pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(**config.scheduler),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        **extra,
    )


QWEN_IMAGE_LORA = LoraFormat(label="Qwen-Image", loader=QwenImagePipeline, components=("transformer",))


class QwenImageFamily(Family):
    name = "qwen-image"
    default_class = QwenImagePipeline
    profile_classes: ClassVar[Mapping[str, type]] = {
        "tiny-qwen-image-edit": QwenImageEditPipeline,
        "qwen-image-edit": QwenImageEditPipeline,
    }
    task_classes: ClassVar[Mapping[str, type]] = {
        "generate": QwenImagePipeline,
        "img2img": QwenImageImg2ImgPipeline,
        "inpaint": QwenImageInpaintPipeline,
        "edit": QwenImageEditPipeline,
    }
    model_components = ("transformer", "text_encoder", "vae")
    lora_format = QWEN_IMAGE_LORA
    trains_loras = False

    def build(self, config: QwenImageBuiltinConfig, pipeline_class: type) -> Any:
        return build_pipeline(config, pipeline_class)

    def layer_models(self, config: QwenImageBuiltinConfig | None, model_path: Path | None) -> LayerModels | None:
        return transformer_layer_models(QwenImageTransformer2DModel, config, model_path, QWEN_IMAGE_LORA)

    def encode_prompt(self, pipe: Any, prompt: str, guidance: float, max_sequence_length: int) -> dict[str, Any]:
        if isinstance(pipe, QwenImageEditPipeline):
            # The edit's text encoding reads the input image: the pipeline runs it (see above).
            return {"prompt": prompt, "negative_prompt": NEGATIVE_PROMPT if guidance > 1 else None}
        device = pipe.transformer.device
        embeds, mask = pipe.encode_prompt(prompt=prompt, device=device, max_sequence_length=max_sequence_length)
        text: dict[str, Any] = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if guidance > 1:
            negative, negative_mask = pipe.encode_prompt(
                prompt=NEGATIVE_PROMPT, device=device, max_sequence_length=max_sequence_length
            )
            text.update(negative_prompt_embeds=negative, negative_prompt_embeds_mask=negative_mask)
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
        arguments: dict[str, Any] = {
            "height": height,
            "width": width,
            "max_sequence_length": max_sequence_length,
            # True CFG; `guidance_scale` is for guidance-distilled checkpoints only.
            "true_cfg_scale": guidance,
            "guidance_scale": None,
        }
        if images is None:
            return arguments
        if task == "edit":
            return {**arguments, "image": images.image}
        arguments.update(image=images.image, strength=strength)
        if images.mask is not None:
            arguments["mask_image"] = images.mask
        return arguments

    def decode(self, pipe: Any, latents: torch.Tensor, height: int, width: int) -> Image.Image:
        # The same arithmetic as QwenImagePipeline.__call__ with output_type="pil".
        vae = pipe.vae
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        latents = latents / std + mean
        image = vae.decode(latents, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]

    def denoising_steps(self, steps: int, strength: float) -> int:
        # QwenImageImg2ImgPipeline.get_timesteps.
        return steps - int(max(steps - min(steps * strength, steps), 0))


QWEN_IMAGE = QwenImageFamily()
