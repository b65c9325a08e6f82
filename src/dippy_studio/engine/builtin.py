"""Built-in Flux-architecture pipelines with seeded random weights.

`tiny` is the engine's default and the tests': the real Flux code path (transformer,
VAE, CLIP and T5 encoders, flow-matching scheduler) at about 150k parameters. `tiny-kontext`
is tiny's architecture with its own seed, built as a FluxKontextPipeline (Kontext's
architecture is FLUX.1's; only the pipeline feeds the input image's latents beside the noise).
`small` is a CPU benchmark size (about 9M transformer parameters, a 4-level VAE like the real one).
`toy` is the one built-in that draws: its weights were trained by this project (`engine.toy`)
and are loaded from the safetensors file committed beside its code instead of being seeded.

Weights are not left to torch's initialisers: those draw from the global RNG in module
construction order and some use vectorised transcendental maths whose last bits may depend
on the CPU. Instead every tensor is drawn from its own NumPy PCG64 stream (seeded by the
profile seed and the tensor's name) with exact integer-to-float arithmetic, so every machine
builds the same bits and a test can pin their sha256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerBase, T5Config, T5EncoderModel

from dippy_studio.engine import tokenizers, toy
from dippy_studio.engine.determinism import realign_parameters
from dippy_studio.engine.toy import text as toy_text

# Flux-dev's scheduler settings (resolution-dependent shift), so the built-ins exercise them.
FLUX_SCHEDULER = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


@dataclass(frozen=True)
class BuiltinConfig:
    """Architecture sizes of a built-in pipeline; the seed decides the weights unless `weights`
    names a safetensors file of trained ones (module-prefixed keys, as `toy_training` writes)."""

    seed: int
    max_sequence_length: int
    transformer: dict[str, Any]
    vae: dict[str, Any]
    clip_width: int
    clip_layers: int
    t5_width: int
    t5_layers: int
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(FLUX_SCHEDULER))
    # "bytes": the character-level tokenizers any prompt fits; "words": the toy vocabulary's.
    tokenizer: Literal["bytes", "words"] = "bytes"
    weights: Path | None = None


TINY = BuiltinConfig(
    seed=20261125,
    max_sequence_length=32,
    transformer=dict(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
        guidance_embeds=True,
    ),
    vae=dict(
        block_out_channels=(4,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
    ),
    clip_width=32,
    clip_layers=2,
    t5_width=32,
    t5_layers=2,
)

# Its own weights, so its fingerprint and outputs can never be mistaken for tiny's.
TINY_KONTEXT = replace(TINY, seed=20261206)

SMALL = BuiltinConfig(
    seed=20261126,
    max_sequence_length=64,
    transformer=dict(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=8,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        axes_dims_rope=(8, 12, 12),
        guidance_embeds=True,
    ),
    vae=dict(
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
    ),
    clip_width=64,
    clip_layers=2,
    t5_width=64,
    t5_layers=2,
)


# Trained by the project (`python -m dippy_studio.engine.toy_training`): a Flux-architecture model of
# about 3.5M parameters that draws one shape of a colour on a background (`engine.toy.data`).
TOY = BuiltinConfig(
    seed=20261207,
    max_sequence_length=16,
    transformer=dict(
        patch_size=1,
        in_channels=32,  # 8 latent channels, 2x2-packed
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        axes_dims_rope=(8, 12, 12),
        # Schnell-like: no guidance embedding, one forward pass per step.
        guidance_embeds=False,
    ),
    vae=dict(
        block_out_channels=(16, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=8,
    ),
    clip_width=64,
    clip_layers=2,
    t5_width=64,
    t5_layers=2,
    tokenizer="words",
    weights=toy.WEIGHTS_PATH,
)

# The VAE latent normalisation of seeded profiles; trained weights carry their own in their header.
SEEDED_VAE_FACTORS = {"shift_factor": 0.0609, "scaling_factor": 1.5035}


def build_tokenizers(config: BuiltinConfig) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
    """The CLIP and T5 tokenizers of `config`, built in code."""
    if config.tokenizer == "words":
        return toy_text.clip_tokenizer(config.max_sequence_length), toy_text.t5_tokenizer(config.max_sequence_length)
    return tokenizers.clip_tokenizer(), tokenizers.t5_tokenizer(config.max_sequence_length)


def build_pipeline(config: BuiltinConfig, pipeline_class: type = FluxPipeline) -> FluxPipeline:
    """Build `pipeline_class` (a Flux pipeline: FluxPipeline, FluxKontextPipeline...) from `config`
    with its seeded (or, when it names a file, trained) weights, in eval mode, float32 on CPU."""
    clip_tok, t5_tok = build_tokenizers(config)
    vae_factors = read_vae_factors(config.weights) if config.weights is not None else SEEDED_VAE_FACTORS
    transformer = FluxTransformer2DModel(**config.transformer)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **vae_factors,
        **config.vae,
    )
    text_encoder = CLIPTextModel(clip_config(config, clip_tok))
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=config.t5_width,
            d_kv=config.t5_width // 4,
            d_ff=config.t5_width * 2,
            num_layers=config.t5_layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
        )
    )
    modules = {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
    }
    if config.weights is not None:
        load_weights(modules, config.weights)
        freeze(modules.values())
    else:
        seed_modules(modules, config.seed)
    return pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(**config.scheduler),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def clip_config(config: BuiltinConfig, clip_tok: PreTrainedTokenizerBase | None = None) -> CLIPTextConfig:
    """The CLIP text encoder's architecture (for the config's own tokenizer unless given)."""
    clip_tok = clip_tok or build_tokenizers(config)[0]
    return CLIPTextConfig(
        vocab_size=len(clip_tok),
        bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id,
        hidden_size=config.clip_width,
        intermediate_size=config.clip_width * 4,
        num_attention_heads=4,
        num_hidden_layers=config.clip_layers,
        projection_dim=config.clip_width,
        max_position_embeddings=clip_tok.model_max_length,
        hidden_act="gelu",
    )


def seed_modules(modules: Mapping[str, torch.nn.Module], seed: int) -> None:
    """Give each of a built-in's modules its seeded weights (`seed_weights`, streams named by the
    component) and make it ready for inference (`freeze`)."""
    for name, module in modules.items():
        seed_weights(module, seed=seed, prefix=name)
    freeze(modules.values())


def freeze(modules: Iterable[torch.nn.Module]) -> None:
    """Eval mode and no gradients: modules built from a config start in train mode, where dropout
    (T5's, say) would eat RNG and change the output."""
    for module in modules:
        module.eval()
        module.requires_grad_(False)


@torch.no_grad()
def seed_weights(module: torch.nn.Module, *, seed: int, prefix: str) -> None:
    """Overwrite every parameter with machine-independent seeded values.

    Matrices and kernels get U(-1/sqrt(fan_in), 1/sqrt(fan_in)) like torch's Linear default.
    Vectors keep their constant init when they have one (norm scales of 1, zero biases
    would be random otherwise) and are otherwise drawn with a small bound.
    """
    for name, param in module.named_parameters():
        full_name = f"{prefix}.{name}"
        data = param.data
        if data.ndim <= 1:
            first = data.flatten()[0]
            if data.numel() > 0 and bool(torch.all(data == first)):
                continue  # a constant init (LayerNorm/RMSNorm scale, zero bias): keep it
            fan_in = 1
        else:
            fan_in = int(np.prod(data.shape[1:]))
        bound = 1.0 / np.sqrt(fan_in) if data.ndim > 1 else 0.02
        stream_seed = int.from_bytes(hashlib.sha256(f"{seed}:{full_name}".encode()).digest()[:8], "little")
        rng = np.random.Generator(np.random.PCG64(stream_seed))
        values = (rng.random(data.numel(), dtype=np.float64) * 2.0 - 1.0) * bound
        param.data = torch.from_numpy(values.astype(np.float32).reshape(tuple(data.shape))).clone()


VAE_FACTOR_KEYS = ("shift_factor", "scaling_factor")


def read_vae_factors(path: Path) -> dict[str, float]:
    """The VAE latent shift and scale recorded in a trained weights file's header."""
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    try:
        return {key: float(metadata[f"vae.{key}"]) for key in VAE_FACTOR_KEYS}
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path} records no valid VAE {exc}: not a trained built-in weights file") from None


@torch.no_grad()
def load_weights(modules: dict[str, torch.nn.Module], path: Path) -> None:
    """Load `path`'s tensors (keys `<module>.<parameter>`) into `modules`, every tensor required.

    The copies are realigned: memory-mapped tensors at unaligned addresses would make MKL take
    other kernels and the loaded model compute different last bits than a built one.
    """
    with safe_open(path, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    for name, module in modules.items():
        prefix = f"{name}."
        state = {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}
        module.load_state_dict(state, strict=True)
        realign_parameters(module)
