"""A plain diffusers + peft Flux LoRA training loop: the baseline the trainer is measured against.

This is the loop of diffusers' `examples/dreambooth/train_dreambooth_lora_flux.py`, minus
accelerate, a data loader and logging: PEFT `add_adapter` on the transformer, AdamW, one
generator for batches, noise and noise levels, flow-matching loss on the unpacked
prediction. With `cache=True` it pre-computes latents and prompt embeddings once, as that
script's `--cache_latents` and fixed-prompt paths do; with `cache=False` it runs the VAE and
both text encoders for every batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from time import perf_counter

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from peft import LoraConfig


@dataclass(frozen=True)
class ReferenceRun:
    seconds: float  # the training loop only (after setup and any caching)
    cache_seconds: float
    losses: list[float]
    step_seconds: list[float]  # each optimizer step's duration


def reference_train(
    pipe: FluxPipeline,
    pixels: torch.Tensor,
    prompts: Sequence[str],
    *,
    steps: int,
    batch_size: int,
    rank: int,
    alpha: float,
    lr: float,
    seed: int,
    targets: Sequence[str],
    max_sequence_length: int,
    guidance: float = 1.0,
    cache: bool = True,
) -> ReferenceRun:
    transformer = pipe.transformer
    vae = pipe.vae
    device, dtype = transformer.device, transformer.dtype
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    )
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)

    def encode_images(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            # The script samples the latent distribution; the mean keeps the data the same as
            # our trainer's (the tiny profile's random VAE has a wide posterior), at the same cost.
            latents = vae.encode(batch.to(device, vae.dtype)).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def encode_text(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return pipe.encode_prompt(
                prompt=batch, prompt_2=None, device=device, max_sequence_length=max_sequence_length
            )

    cache_started = perf_counter()
    if cache:
        all_latents = encode_images(pixels)
        all_embeds, all_pooled, text_ids = encode_text(list(prompts))
    cache_seconds = perf_counter() - cache_started

    generator = torch.Generator("cpu").manual_seed(seed)
    losses = []
    step_seconds = []
    transformer.train()
    started = last = perf_counter()
    for _ in range(steps):
        index = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        if cache:
            model_input = all_latents[index]
            prompt_embeds, pooled, ids = all_embeds[index], all_pooled[index], text_ids
        else:
            model_input = encode_images(pixels[index])
            prompt_embeds, pooled, ids = encode_text([prompts[i] for i in index.tolist()])
        model_input = model_input.to(dtype)
        batch, channels, height, width = model_input.shape
        latent_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        noise = torch.randn(model_input.shape, generator=generator).to(device, dtype)
        sigmas = torch.sigmoid(torch.randn(batch, generator=generator)).to(device, dtype)  # logit-normal
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1.0 - s) * model_input + s * noise
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        guidance_vec = torch.full((batch,), guidance, device=device, dtype=torch.float32)
        model_pred = transformer(
            hidden_states=packed,
            timestep=sigmas,
            guidance=guidance_vec if transformer.config.guidance_embeds else None,
            pooled_projections=pooled,
            encoder_hidden_states=prompt_embeds,
            txt_ids=ids,
            img_ids=latent_ids,
            return_dict=False,
        )[0]
        model_pred = FluxPipeline._unpack_latents(
            model_pred, height * pipe.vae_scale_factor, width * pipe.vae_scale_factor, pipe.vae_scale_factor
        )
        target = noise - model_input
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        now = perf_counter()
        step_seconds.append(now - last)
        last = now
    seconds = perf_counter() - started
    transformer.eval()
    return ReferenceRun(seconds=seconds, cache_seconds=cache_seconds, losses=losses, step_seconds=step_seconds)
