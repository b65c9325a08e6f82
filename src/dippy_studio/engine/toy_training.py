"""Train the toy model from scratch: `python -m dippy_studio.engine.toy_training --out FILE`.

Two stages, each seeded and single-threaded, so the same command writes the same bytes:

1. The VAE (AutoencoderKL, 64x64 pictures to 8x8 latents of 8 channels) learns to reconstruct
   freshly drawn pictures (`toy.data.samples`, objects anywhere in the middle of the frame):
   mean squared error plus a small KL term that keeps the latents near a unit Gaussian. Its
   latent mean and spread over the training set become the VAE's `shift_factor` and
   `scaling_factor`, as FluxPipeline normalises latents with them.
2. The transformer and both text encoders learn together, on pictures with centred objects,
   with rectified flow matching exactly the way FluxPipeline samples: at noise level `s`,
   `x_s = (1 - s) * x0 + s * noise`, packed 2x2 into 16 tokens with Flux's image ids, and the
   model (called with timestep `s`, which is the pipeline's `t / 1000`) predicts `noise - x0`
   (`training.flow_matching_loss`). An exponential moving average of the weights is saved.

The architecture is `builtin.TOY`'s; training starts from its seeded weights. The output holds
every module's tensors under `<module>.` keys plus the VAE factors in its header, the layout
`builtin.build_pipeline` loads. The trained VAE also goes to `NAME.vae.safetensors`, so
`--vae-from` can rerun stage 2 alone (with the same settings, to the same bytes).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import PreTrainedTokenizerBase

from dippy_studio.engine import builtin
from dippy_studio.engine.determinism import configure_threads
from dippy_studio.engine.toy import WEIGHTS_PATH, check, data
from dippy_studio.engine.training import derived_seed, flow_matching_loss, image_ids, write_safetensors

MODULES = ("transformer", "vae", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class ToyTraining:
    """Every setting of a training run (recorded in the weights file's header)."""

    seed: int = 0
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    images: int = 8192  # the transformer's training set, encoded once
    steps: int = 8000
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 100
    ema: float = 0.999
    threads: int = 1


def pixels(images: list, size: int = data.SIZE) -> torch.Tensor:
    """(N, 3, H, W) float32 in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then a cosine down to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class Reporter:
    """A progress bar on a terminal, a line every `every` steps in a log."""

    def __init__(self, console: Console, every: int = 100) -> None:
        self.console = console
        self.every = every
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
        )

    def stage(self, name: str, total: int) -> StageReport:
        return StageReport(self, name, total)


class StageReport:
    def __init__(self, reporter: Reporter, name: str, total: int) -> None:
        self.reporter, self.name, self.total = reporter, name, total
        self.task = reporter.progress.add_task(name, total=total, loss=float("nan"))
        self.started = time.perf_counter()
        self.recent: list[float] = []

    def step(self, step: int, loss: float) -> None:
        self.recent.append(loss)
        self.reporter.progress.update(self.task, completed=step + 1, loss=float(np.mean(self.recent[-50:])))
        if (step + 1) % self.reporter.every == 0 or step + 1 == self.total:
            elapsed = time.perf_counter() - self.started
            self.reporter.console.log(
                f"{self.name} step {step + 1}/{self.total} loss {np.mean(self.recent[-self.reporter.every :]):.5f} "
                f"({elapsed:.0f} s)"
            )


def train_vae(pipe: FluxPipeline, config: ToyTraining, report: StageReport) -> None:
    vae = pipe.vae
    vae.requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    for step in range(config.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr * cosine_lr(step, config.vae_steps, config.warmup)
        batch = pixels([image for _, image in data.samples(config.vae_batch, derived_seed(config.seed, "vae", step))])
        generator = torch.Generator("cpu").manual_seed(derived_seed(config.seed, "vae-noise", step))
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + config.kl_weight * posterior.kl().mean() / (
            latents[0].numel()
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        report.step(step, float(loss.item()))
    vae.requires_grad_(False)


@torch.no_grad()
def encode_images(pipe: FluxPipeline, images: list) -> torch.Tensor:
    """Raw latent means, 256 pictures at a time."""
    chunks = [pipe.vae.encode(pixels(images[i : i + 256])).latent_dist.mode() for i in range(0, len(images), 256)]
    return torch.cat(chunks)


def set_vae_factors(pipe: FluxPipeline, raw: torch.Tensor) -> None:
    """Normalise latents to zero mean, unit spread over the training set, the way Flux's own VAE
    factors were chosen. Rounded so the header records them exactly."""
    shift = round(float(raw.mean()), 4)
    scale = round(1.0 / float(raw.std()), 4)
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)


def token_ids(pipe: FluxPipeline, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP and T5 ids exactly as FluxPipeline tokenizes (padded to the maximum length)."""

    def ids(tokenizer: PreTrainedTokenizerBase, length: int) -> torch.Tensor:
        encoded = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return encoded.input_ids

    return ids(pipe.tokenizer, pipe.tokenizer.model_max_length), ids(pipe.tokenizer_2, max_length)


def train_denoiser(
    pipe: FluxPipeline,
    config: ToyTraining,
    report: StageReport,
    console: Console,
    snapshot: tuple[Path, int] | None = None,
) -> None:
    """Stage 2. With `snapshot` (path, every), the averaged weights so far are written every that
    many steps, to look at the pictures while the run goes on."""
    # Centred objects: the one freedom left is the shape itself, which a model this small then
    # learns crisply in minutes (the VAE saw objects anywhere, so it encodes any picture).
    images = data.samples(config.images, derived_seed(config.seed, "images"), centred=True)
    console.log(f"encoding {len(images)} training pictures")
    raw = encode_images(pipe, [image for _, image in images])
    set_vae_factors(pipe, raw)
    latents = (raw - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    clip_ids, t5_ids = token_ids(pipe, [scene.caption for scene, _ in images], builtin.TOY.max_sequence_length)
    text_ids = torch.zeros(t5_ids.shape[1], 3)
    img_ids = image_ids(pipe, latents.shape[2], latents.shape[3])

    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    params = [param for module in modules for param in module.parameters()]
    for param in params:
        param.requires_grad_(True)
    ema = [param.detach().clone() for param in params]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * cosine_lr(step, config.steps, config.warmup)
        generator = torch.Generator("cpu").manual_seed(derived_seed(config.seed, "step", step))
        index = torch.randint(0, len(images), (config.batch,), generator=generator)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        sigmas = torch.sigmoid(torch.randn(config.batch, generator=generator))
        pooled = pipe.text_encoder(clip_ids[index], output_hidden_states=False).pooler_output
        embeds = pipe.text_encoder_2(t5_ids[index], output_hidden_states=False)[0]
        loss = flow_matching_loss(pipe, x0, noise, sigmas, embeds, pooled, text_ids, img_ids, 1.0, per_image=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(config.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [param.detach() for param in params], 1.0 - decay)
        report.step(step, float(loss.item()))
        if snapshot is not None and (step + 1) % snapshot[1] == 0:
            with torch.no_grad():
                for param, average in zip(params, ema, strict=True):
                    param.data, average.data = average.data, param.data  # swap in the average...
                save(pipe, snapshot[0].with_name(f"{snapshot[0].stem}.step{step + 1}.safetensors"), config)
                for param, average in zip(params, ema, strict=True):
                    param.data, average.data = average.data, param.data  # ... and back
    with torch.no_grad():
        for param, average in zip(params, ema, strict=True):
            param.copy_(average)
            param.requires_grad_(False)


@torch.no_grad()
def generate(pipe: FluxPipeline, scenes: list[data.Scene], seed: int = 0, steps: int = 20) -> list:
    """One picture per scene, with per-picture seeds `seed + i`, as the engine would draw them."""
    pipe.set_progress_bar_config(disable=True)
    out = []
    for offset, scene in enumerate(scenes):
        generator = torch.Generator("cpu").manual_seed(seed + offset)
        result = pipe(
            prompt=scene.caption,
            height=data.SIZE,
            width=data.SIZE,
            num_inference_steps=steps,
            generator=generator,
            max_sequence_length=builtin.TOY.max_sequence_length,
        )
        out.append(result.images[0])
    return out


def save(pipe: FluxPipeline, path: Path, config: ToyTraining) -> None:
    modules = {name: getattr(pipe, name) for name in MODULES}
    tensors = {f"{name}.{key}": value for name, module in modules.items() for key, value in module.state_dict().items()}
    metadata = {f"vae.{key}": repr(float(pipe.vae.config[key])) for key in builtin.VAE_FACTOR_KEYS}
    metadata.update({f"toy.{key}": str(value) for key, value in asdict(config).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, tensors, metadata)


def load_vae(pipe: FluxPipeline, path: Path) -> None:
    """Take the VAE (and its factors) from an earlier run's file: stage 2 alone, for iterating."""
    builtin.load_weights({"vae": pipe.vae}, path)
    pipe.vae.register_to_config(**builtin.read_vae_factors(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dippy_studio.engine.toy_training", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="weights file to write (default: the package's)")
    defaults = ToyTraining()
    for key, value in asdict(defaults).items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--vae-from", type=Path, help="reuse the VAE of an earlier output and skip stage 1")
    parser.add_argument("--snapshot-every", type=int, default=0, help="write the weights so far every N steps")
    parser.add_argument("--check", type=int, default=48, help="score this many check prompts at the end (0: none)")
    args = parser.parse_args(argv)
    config = ToyTraining(**{key: getattr(args, key) for key in asdict(defaults)})
    console = Console(stderr=True)
    configure_threads(config.threads)
    torch.manual_seed(config.seed)  # nothing should draw from it; if something does, it is seeded
    pipe = builtin.build_pipeline(replace(builtin.TOY, weights=None))
    reporter = Reporter(console)
    started = time.perf_counter()
    with reporter.progress:
        if args.vae_from is not None:
            load_vae(pipe, args.vae_from)
            console.log(f"VAE from {args.vae_from}")
        else:
            train_vae(pipe, config, reporter.stage("vae", config.vae_steps))
            vae_path = args.out.with_name(args.out.stem + ".vae.safetensors")
            save(pipe, vae_path, config)
            console.log(f"stage 1 written to {vae_path}")
        snapshot = (args.out, args.snapshot_every) if args.snapshot_every else None
        train_denoiser(pipe, config, reporter.stage("transformer", config.steps), console, snapshot)
    save(pipe, args.out, config)
    console.log(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")
    if args.check:
        scenes = check.check_scenes(args.check)
        console.log(f"check: {check.score(list(zip(scenes, generate(pipe, scenes), strict=True)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
