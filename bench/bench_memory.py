"""GPU memory per profile, from full-size architectures built on the meta device.

    .venv/bin/python bench/bench_memory.py                 # every family, a table
    .venv/bin/python bench/bench_memory.py --only flux-dev # one profile (repeatable)
    .venv/bin/python bench/bench_memory.py --json          # one JSON object instead

Each component is built from its published configuration (transcribed below; nothing is
downloaded) under `torch.device("meta")`: every parameter has its shape and dtype but no storage,
so a 32B-parameter model builds in seconds on a laptop. Weight memory is exact (parameters and
buffers times bytes per element). Activations are an estimate, stated with its formula:

- denoiser, one step at 1024x1024: B x T x (2d + m_in + m_out) x 2 bytes (bf16). T = image
  tokens + text tokens, d = model width, m_in / m_out = the MLP's widths before / after its
  activation (gated MLPs compute 2x their hidden width first), B = batch per forward (2 where the
  pipeline batches classifier-free guidance). It counts the residual stream, the normed input and
  the MLP's widest pair of tensors, with a fused attention kernel (no T x T matrix): the block
  with the widest live set, since inference keeps no activations across blocks.
- VAE decode to 1024x1024: 3 x C x 1024 x 1024 x 2 bytes, C = channels of the last upsampler's
  output (input, normed and convolved tensors of the full-resolution layer).

The two do not overlap in time, so the peak is the larger one. "GPU memory needed (bf16)" is every
component's weights resident at once plus that peak, without CUDA context, allocator slack or
offloading (moving the text encoders off the GPU after encoding lowers it by their weights).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

GIB = 1024**3
SIDE = 1024


@dataclass(frozen=True)
class Component:
    """One model of a pipeline: its role, class name (for the table) and how to build it."""

    role: str
    class_name: str
    build: Callable[[], torch.nn.Module]


@dataclass(frozen=True)
class Activation:
    """The inputs of the denoiser activation formula (see the module docstring)."""

    image_tokens: int
    text_tokens: int
    width: int
    mlp_in: int
    mlp_out: int
    batch: int = 1
    vae_channels: int = 256

    @property
    def denoiser_bytes(self) -> int:
        tokens = self.image_tokens + self.text_tokens
        return self.batch * tokens * (2 * self.width + self.mlp_in + self.mlp_out) * 2

    @property
    def vae_decode_bytes(self) -> int:
        return 3 * self.vae_channels * SIDE * SIDE * 2


@dataclass(frozen=True)
class Family:
    profile: str
    components: tuple[Component, ...]
    activation: Activation


@dataclass
class Row:
    profile: str
    component: str
    class_name: str
    params: int | None = None
    weights_bf16_gib: float | None = None
    weights_fp32_gib: float | None = None
    build_s: float | None = None
    error: str | None = None


@dataclass
class Summary:
    profile: str
    rows: list[Row] = field(default_factory=list)
    denoiser_activation_gib: float = 0.0
    vae_decode_activation_gib: float = 0.0
    total_bf16_gib: float | None = None
    complete: bool = True


# --- the published configurations --------------------------------------------------------------


def _flux1_transformer() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )


def _t5_xxl() -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    return T5EncoderModel(config)


def _clip_l() -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    return CLIPTextModel(config)


def _clip_bigg() -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=77,
        projection_dim=1280,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config)


def _vae_kl(latent_channels: int, scaling_factor: float, shift_factor: float | None, quant_conv: bool):
    def build() -> torch.nn.Module:
        from diffusers import AutoencoderKL

        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=latent_channels,
            norm_num_groups=32,
            sample_size=1024,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=quant_conv,
            use_post_quant_conv=quant_conv,
        )

    return build


def _flux2_transformer() -> torch.nn.Module:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=8,
        num_single_layers=48,
        attention_head_dim=128,
        num_attention_heads=48,
        joint_attention_dim=15360,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32),
        rope_theta=2000,
        guidance_embeds=True,
    )


def _mistral_small_31() -> torch.nn.Module:
    """FLUX.2-dev's text encoder: Mistral Small 3.1 (24B), text model plus Pixtral vision tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": 131072,
            "hidden_size": 5120,
            "intermediate_size": 32768,
            "num_hidden_layers": 40,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 131072,
            "rope_theta": 1000000000.0,
            "tie_word_embeddings": False,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "head_dim": 64,
            "patch_size": 14,
            "image_size": 1540,
        },
        spatial_merge_size=2,
        multimodal_projector_bias=False,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    return Mistral3ForConditionalGeneration(config)


def _flux2_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(latent_channels=32, block_out_channels=(128, 256, 512, 512), use_quant_conv=True)


def _qwen_image_transformer() -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=60,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=3584,
        guidance_embeds=False,
        axes_dims_rope=(16, 56, 56),
    )


def _qwen25_vl_7b() -> torch.nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 128000,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _qwen_image_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2)


def _zimage_transformer() -> torch.nn.Module:
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=3840,
        n_layers=30,
        n_refiner_layers=2,
        n_heads=30,
        n_kv_heads=30,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=2560,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[32, 48, 48],
        axes_lens=[1536, 512, 512],
    )


def _qwen3_4b() -> torch.nn.Module:
    """Z-Image's text encoder: the Qwen3-4B base model (hidden states only, no LM head)."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    )
    return Qwen3Model(config)


def _sdxl_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


# 1024x1024 images: a 128x128 latent (VAE factor 8) packed 2x2 into 64x64 = 4096 tokens for the
# Flux, Qwen-Image and Z-Image transformers; FLUX.2's VAE folds the 2x2 patch in itself (factor 16).
_IMAGE_TOKENS = (SIDE // 16) ** 2
_FLUX1_COMPONENTS = (
    Component("transformer", "FluxTransformer2DModel", _flux1_transformer),
    Component("text_encoder", "CLIPTextModel (CLIP-L)", _clip_l),
    Component("text_encoder_2", "T5EncoderModel (T5-XXL)", _t5_xxl),
    Component("vae", "AutoencoderKL (16 ch)", _vae_kl(16, 0.3611, 0.1159, quant_conv=False)),
)
_FLUX1_ACTIVATION = Activation(_IMAGE_TOKENS, 512, width=3072, mlp_in=12288, mlp_out=12288)

FAMILIES: dict[str, Family] = {
    "flux-dev": Family("flux-dev", _FLUX1_COMPONENTS, _FLUX1_ACTIVATION),
    # Kontext appends the reference image's tokens to the sequence: twice the image tokens.
    "flux-kontext": Family(
        "flux-kontext", _FLUX1_COMPONENTS, Activation(2 * _IMAGE_TOKENS, 512, width=3072, mlp_in=12288, mlp_out=12288)
    ),
    "flux2-dev": Family(
        "flux2-dev",
        (
            Component("transformer", "Flux2Transformer2DModel", _flux2_transformer),
            Component("text_encoder", "Mistral3ForConditionalGeneration (Mistral Small 3.1)", _mistral_small_31),
            Component("vae", "AutoencoderKLFlux2 (32 ch)", _flux2_vae),
        ),
        # SwiGLU: 2 x 18432 before the gate, 18432 after.
        Activation(_IMAGE_TOKENS, 512, width=6144, mlp_in=2 * 18432, mlp_out=18432),
    ),
    "qwen-image": Family(
        "qwen-image",
        (
            Component("transformer", "QwenImageTransformer2DModel", _qwen_image_transformer),
            Component("text_encoder", "Qwen2_5_VLForConditionalGeneration (Qwen2.5-VL-7B)", _qwen25_vl_7b),
            Component("vae", "AutoencoderKLQwenImage", _qwen_image_vae),
        ),
        # True CFG runs the conditional and unconditional passes one after the other (B = 1).
        Activation(_IMAGE_TOKENS, 512, width=3072, mlp_in=12288, mlp_out=12288, vae_channels=192),
    ),
    "z-image": Family(
        "z-image",
        (
            Component("transformer", "ZImageTransformer2DModel", _zimage_transformer),
            Component("text_encoder", "Qwen3Model (Qwen3-4B)", _qwen3_4b),
            Component("vae", "AutoencoderKL (16 ch)", _vae_kl(16, 0.3611, 0.1159, quant_conv=False)),
        ),
        Activation(_IMAGE_TOKENS, 512, width=3840, mlp_in=2 * 10240, mlp_out=10240),
    ),
    "sdxl": Family(
        "sdxl",
        (
            Component("unet", "UNet2DConditionModel", _sdxl_unet),
            Component("text_encoder", "CLIPTextModel (CLIP-L)", _clip_l),
            Component("text_encoder_2", "CLIPTextModelWithProjection (OpenCLIP bigG)", _clip_bigg),
            Component("vae", "AutoencoderKL (4 ch)", _vae_kl(4, 0.13025, None, quant_conv=True)),
        ),
        # The widest attention level: 64x64 latent tokens, width 640, GEGLU (2 x 2560, then 2560);
        # diffusers batches the conditional and unconditional passes (B = 2).
        Activation((SIDE // 16) ** 2, 77, width=640, mlp_in=5120, mlp_out=2560, batch=2),
    ),
}


# --- measuring ----------------------------------------------------------------------------------


def tensor_bytes(module: torch.nn.Module, bytes_per_element: int) -> tuple[int, int]:
    """(parameter count, bytes of parameters and floating-point buffers at that element size).
    Integer buffers (position ids) keep their own size."""
    params = sum(p.numel() for p in module.parameters())
    size = params * bytes_per_element
    for buffer in module.buffers():
        size += buffer.numel() * (bytes_per_element if buffer.is_floating_point() else buffer.element_size())
    return params, size


def measure_component(profile: str, component: Component) -> Row:
    row = Row(profile, component.role, component.class_name)
    started = time.perf_counter()
    try:
        with torch.device("meta"):
            module = component.build()
    except Exception as exc:  # any failure to build is reported in the row, not raised
        row.error = f"not built offline: {type(exc).__name__}: {exc}".splitlines()[0][:200]
        return row
    row.build_s = round(time.perf_counter() - started, 2)
    row.params, bf16 = tensor_bytes(module, 2)
    row.weights_bf16_gib = bf16 / GIB
    row.weights_fp32_gib = tensor_bytes(module, 4)[1] / GIB
    return row


def measure(profile: str) -> Summary:
    family = FAMILIES[profile]
    summary = Summary(profile)
    summary.rows = [measure_component(profile, component) for component in family.components]
    summary.denoiser_activation_gib = family.activation.denoiser_bytes / GIB
    summary.vae_decode_activation_gib = family.activation.vae_decode_bytes / GIB
    summary.complete = all(row.error is None for row in summary.rows)
    if summary.complete:
        weights = sum(row.weights_bf16_gib or 0.0 for row in summary.rows)
        summary.total_bf16_gib = weights + max(summary.denoiser_activation_gib, summary.vae_decode_activation_gib)
    return summary


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _params(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}B" if value >= 1e9 else f"{value / 1e6:.0f}M"


def markdown(summaries: list[Summary]) -> str:
    """The table as bench/README.md shows it."""
    lines = [
        "| profile | component | class | parameters | bf16 GiB | fp32 GiB |",
        "|---|---|---|---:|---:|---:|",
    ]
    for summary in summaries:
        for row in summary.rows:
            detail = row.error or ""
            lines.append(
                f"| {row.profile} | {row.component} | {row.class_name}{' ' + detail if detail else ''} "
                f"| {_params(row.params)} | {_gib(row.weights_bf16_gib)} | {_gib(row.weights_fp32_gib)} |"
            )
        lines.append(
            f"| {summary.profile} | activations, 1024x1024 | denoiser step / VAE decode | | "
            f"{_gib(summary.denoiser_activation_gib)} / {_gib(summary.vae_decode_activation_gib)} | |"
        )
        total = _gib(summary.total_bf16_gib) if summary.complete else "incomplete (a component did not build)"
        lines.append(f"| **{summary.profile}** | **GPU memory needed (bf16)** | | | **{total}** | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(FAMILIES), help="profile to measure (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    summaries = [measure(name) for name in (args.only or FAMILIES)]
    if args.json:
        print(json.dumps({"side": SIDE, "profiles": [asdict(s) for s in summaries]}, indent=2))
    else:
        print(markdown(summaries))
    return 0 if all(s.complete for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
