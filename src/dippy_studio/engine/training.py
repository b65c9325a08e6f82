"""Flow-matching LoRA training of the Flux transformer: deterministic, resumable, time-boxed.

The algorithm, top to bottom (`train_lora`):

1. Load a fresh pipeline for the profile (never one an Engine is serving), pin the threads.
2. Encode every image (VAE, scaled and shifted) and every caption (CLIP + T5) once.
3. Add a PEFT LoRA to the transformer's target layers, initialised from the run's seed.
4. For each step: pick a batch, draw noise and a noise level `s` per image, and train the
   transformer to predict the flow `noise - x0` at `x_s = (1 - s) * x0 + s * noise`.
5. Write the LoRA in diffusers format with its provenance in the safetensors header.

Every random draw of step `k` comes from a generator seeded by (seed, k), and the batch of
step `k` from a per-epoch permutation seeded by (seed, epoch). Nothing depends on history
beyond the LoRA weights and the optimizer state, so a checkpoint (weights, AdamW moments,
step) resumes to exactly the bytes an uninterrupted run writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any, Literal

import numpy as np
import torch
from diffusers import FluxPipeline
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors import SafetensorError, safe_open

from dippy_studio.engine.construction import CONSTRUCTION
from dippy_studio.engine.datasets import Dataset, load_dataset, resize_center_crop
from dippy_studio.engine.determinism import configure_threads
from dippy_studio.engine.errors import DatasetError, TrainingError
from dippy_studio.engine.profiles import EngineOptions, get_profile
from dippy_studio.protocol.limits import DEFAULT_TARGETS, MAX_SEED, PROFILE_LIMITS, REAL_MODEL_TRAINING, SIZE_MULTIPLE

ADAPTER_NAME = "dippy_train"
META = "dippy."  # prefix of our keys in the safetensors header
FORMAT_VERSION = "1"

# The defaults live in protocol.limits, beside the profiles' request limits, where the
# orchestrator reads them without importing torch. Plain dicts here for TrainConfig.
REAL_MODEL_DEFAULTS: dict[str, Any] = REAL_MODEL_TRAINING.as_dict()
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    name: limits.training.as_dict() for name, limits in PROFILE_LIMITS.items()
}


class TrainConfig(BaseModel):
    """What is learned and how. Fields left out take the profile's defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: str = "tiny"
    trigger: str | None = Field(default=None, min_length=1, max_length=100)
    rank: int = Field(ge=1, le=512)
    alpha: float = Field(gt=0, le=4096, allow_inf_nan=False)
    targets: tuple[str, ...] = Field(default=DEFAULT_TARGETS, min_length=1, max_length=64)
    lr: float = Field(gt=0, allow_inf_nan=False)
    steps: int = Field(ge=1, le=1_000_000)
    batch_size: int = Field(ge=1, le=256)
    resolution: int = Field(ge=SIZE_MULTIPLE, le=4096)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    weight_decay: float = Field(default=1e-4, ge=0, allow_inf_nan=False)
    max_grad_norm: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    # sigmoid(N(0, 1)) noise levels (ai-toolkit's "sigmoid") favour the middle of the schedule.
    timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    guidance: float = Field(default=1.0, ge=0, le=30, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _profile_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            given = {key: value for key, value in data.items() if value is not None}
            defaults = dict(PROFILE_DEFAULTS.get(given.get("profile", "tiny"), REAL_MODEL_DEFAULTS))
            if "rank" in given and "alpha" not in given:
                defaults["alpha"] = float(given["rank"])  # alpha = rank: a LoRA at its natural scale
            return {**defaults, **given}
        return data

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, profile: str) -> str:
        spec = get_profile(profile)  # ProfileError (a ValueError) names the known ones
        if not spec.model_family.trains_loras:
            # The loop below is Flux's (flow matching on packed latents); other families only
            # apply LoRAs trained elsewhere.
            raise ValueError(f"profile {profile} is a {spec.family} model; LoRA training runs on Flux profiles only")
        return profile

    @field_validator("trigger")
    @classmethod
    def _one_line_trigger(cls, trigger: str | None) -> str | None:
        if trigger is not None and (not trigger.strip() or any(c in trigger for c in "\r\n\t[]")):
            raise ValueError("the trigger word must be one line of text without tabs or brackets")
        return trigger.strip() if trigger is not None else None

    @field_validator("targets")
    @classmethod
    def _target_names(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        for target in targets:
            if not target or not all(part.isidentifier() or part.isdigit() for part in target.split(".")):
                raise ValueError(f"{target!r} is not a module name like 'to_q' or 'attn.to_out.0'")
        return targets

    @field_validator("resolution")
    @classmethod
    def _resolution_multiple(cls, resolution: int) -> int:
        if resolution % SIZE_MULTIPLE:
            raise ValueError(f"{resolution} is not a multiple of {SIZE_MULTIPLE}")
        return resolution


@dataclass(frozen=True)
class TrainProgress:
    """Reported after every optimizer step."""

    step: int
    total: int
    loss: float
    elapsed: float
    eta: float | None


ProgressCallback = Callable[[TrainProgress], None]


@dataclass(frozen=True)
class TrainResult:
    path: Path
    sha256: str
    steps: int  # optimizer steps in the LoRA, resumed ones included
    planned_steps: int
    stopped_early: bool  # the time budget ran out first
    losses: tuple[float, ...]  # one per step, resumed ones included
    seconds: float  # this call, from start to file written
    cache_seconds: float  # encoding images and captions
    train_seconds: float  # the optimizer steps of this call
    metadata: dict[str, str]
    checkpoint: Path | None
    steps_this_run: int

    @property
    def steps_per_second(self) -> float:
        """Optimizer steps per second of this call (resumed steps not counted)."""
        return self.steps_this_run / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def final_loss(self) -> float | None:
        """Mean loss of the last (up to) 10 steps."""
        tail = self.losses[-10:]
        return float(np.mean(tail)) if tail else None


@dataclass(frozen=True)
class EncodedDataset:
    """What the transformer sees of a dataset, computed once: latents and text embeddings."""

    latents: torch.Tensor  # (N, C, h, w), scaled and shifted like the pipeline's
    prompt_embeds: torch.Tensor  # (N, L, D) T5
    pooled: torch.Tensor  # (N, D) CLIP
    text_ids: torch.Tensor  # (L, 3)
    img_ids: torch.Tensor  # (h/2 * w/2, 3)


@dataclass
class _Run:
    """Everything one training call holds while it runs."""

    config: TrainConfig
    pipe: FluxPipeline
    fingerprint: str
    dataset: Dataset
    params: list[tuple[str, torch.nn.Parameter]]
    optimizer: torch.optim.Optimizer
    max_sequence_length: int
    trainable: list[torch.nn.Parameter] = field(default_factory=list)
    encoded: EncodedDataset | None = None
    pixels: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    step: int = 0
    _epochs: dict[int, list[int]] = field(default_factory=dict)


def train_lora(
    dataset: Dataset | Path,
    output: Path,
    config: TrainConfig | None = None,
    *,
    options: EngineOptions | None = None,
    resume: Path | None = None,
    checkpoint_every: int | None = None,
    checkpoint_path: Path | None = None,
    max_seconds: float | None = None,
    cache: bool = True,
    on_progress: ProgressCallback | None = None,
) -> TrainResult:
    """Train a LoRA on `dataset` and write it to `output` (.safetensors).

    `options` says how to load the profile (model path, device, dtype, threads); its profile
    must be `config.profile`. With `checkpoint_every`, the run state is saved every that many
    steps and at the end (so a finished or time-boxed run can be extended) to `checkpoint_path`,
    by default next to the output as `NAME.ckpt.safetensors`; `resume` continues from such a
    file with the same config (`steps` may differ) on the same dataset and profile. `max_seconds`
    bounds the whole call: no new step starts after it, and the LoRA learned so far is written.
    `cache=False` re-encodes images and captions every step (for benchmarks; same result).
    """
    started = perf_counter()
    deadline = started + max_seconds if max_seconds is not None else None
    config = config or TrainConfig()
    options = options or EngineOptions(profile=config.profile)
    if options.profile != config.profile:
        raise TrainingError(f"the config is for profile {config.profile!r} but the engine loads {options.profile!r}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise TrainingError("checkpoint_every must be at least 1")
    if max_seconds is not None and not max_seconds > 0:
        raise TrainingError("max_seconds must be a positive number of seconds")
    if not str(output).endswith(".safetensors"):
        raise TrainingError(f"{output}: the LoRA is written as .safetensors; name the output NAME.safetensors")
    if isinstance(dataset, Path):
        dataset = load_dataset(dataset)
    checkpoint_path = checkpoint_path or output.with_name(
        output.name.removesuffix(".safetensors") + ".ckpt.safetensors"
    )

    run = _start(config, options, dataset)
    cache_started = perf_counter()
    _prepare_inputs(run, cache)
    cache_seconds = perf_counter() - cache_started
    if resume is not None:
        _load_checkpoint(run, resume)

    first_step = run.step
    train_started = perf_counter()
    stopped_early = False
    run.pipe.transformer.train()
    try:
        while run.step < config.steps:
            if deadline is not None and perf_counter() >= deadline:
                stopped_early = True
                break
            loss = _train_step(run)
            if checkpoint_every is not None and run.step % checkpoint_every == 0:
                _save_checkpoint(run, checkpoint_path)
            if on_progress is not None:
                now = perf_counter()
                eta = (now - train_started) / (run.step - first_step) * (config.steps - run.step)
                if deadline is not None:
                    eta = min(eta, max(0.0, deadline - now))
                on_progress(TrainProgress(run.step, config.steps, loss, now - started, eta))
    finally:
        run.pipe.transformer.eval()
    train_seconds = perf_counter() - train_started
    if checkpoint_every is not None and run.step % checkpoint_every != 0:
        _save_checkpoint(run, checkpoint_path)  # the state at the end, so a run can be extended later

    metadata = lora_metadata(run)
    sha = write_lora(run, output, metadata)
    return TrainResult(
        path=output,
        sha256=sha,
        steps=run.step,
        planned_steps=config.steps,
        stopped_early=stopped_early,
        losses=tuple(run.losses),
        seconds=perf_counter() - started,
        cache_seconds=cache_seconds,
        train_seconds=train_seconds,
        metadata=metadata,
        checkpoint=checkpoint_path if checkpoint_every is not None and checkpoint_path.exists() else None,
        steps_this_run=run.step - first_step,
    )


def _start(config: TrainConfig, options: EngineOptions, dataset: Dataset) -> _Run:
    # An Engine of our own: a fresh pipeline plus the fingerprint the LoRA is recorded against.
    from peft import LoraConfig

    from dippy_studio.engine import Engine

    spec = get_profile(config.profile)
    if not spec.min_side <= config.resolution <= spec.max_side:
        raise TrainingError(
            f"resolution {config.resolution} is outside {spec.min_side}..{spec.max_side} for profile {spec.name}"
        )
    engine = Engine(options)
    configure_threads(options.threads)
    pipe = engine.pipe
    transformer = pipe.transformer
    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=list(config.targets),
        lora_dropout=0.0,
        init_lora_weights=True,
    )
    try:
        with CONSTRUCTION:
            transformer.add_adapter(lora_config, adapter_name=ADAPTER_NAME)
    except ValueError as exc:
        raise TrainingError(f"LoRA targets {list(config.targets)} do not fit the transformer: {exc}") from None
    params = [(name, param) for name, param in transformer.named_parameters() if ".lora_" in name]
    _init_lora(params, config.seed)
    optimizer = torch.optim.AdamW(
        [param for _, param in params],
        lr=config.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=config.weight_decay,
        # One kernel for all LoRA tensors instead of a handful of small ops per tensor; it is
        # elementwise, so as deterministic as the loop it replaces (and thread-count independent).
        fused=True,
    )
    return _Run(
        config=config,
        pipe=pipe,
        fingerprint=engine.fingerprint,
        dataset=dataset,
        params=params,
        optimizer=optimizer,
        max_sequence_length=spec.max_sequence_length,
        trainable=[param for _, param in params],
    )


@torch.no_grad()
def _init_lora(params: list[tuple[str, torch.nn.Parameter]], seed: int) -> None:
    """PEFT's init (A ~ U(+-1/sqrt(fan_in)), B = 0) from the run's seed, never the global RNG."""
    for name, param in params:
        param.data = param.data.float()  # LoRA weights train in float32 whatever the model dtype
        param.requires_grad_(True)
        if ".lora_A." in name:
            generator = torch.Generator("cpu").manual_seed(derived_seed(seed, "init", name))
            bound = 1.0 / math.sqrt(param.shape[1])
            values = (torch.rand(tuple(param.shape), generator=generator, dtype=torch.float32) * 2 - 1) * bound
            param.data = values.to(param.device)
        else:
            param.zero_()


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, the same on every machine (no Python hash randomisation)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _prepare_inputs(run: _Run, cache: bool) -> None:
    config = run.config
    run.prompts = run.dataset.captions(config.trigger)
    run.pixels = pixel_tensor(run.dataset, config.resolution)
    if cache:
        run.encoded = encode_dataset(run.pipe, run.pixels, run.prompts, run.max_sequence_length)


def pixel_tensor(dataset: Dataset, resolution: int) -> torch.Tensor:
    """(N, 3, R, R) float32 in [-1, 1]: every image resized and center-cropped to R."""
    arrays = []
    for item in dataset.items:
        try:
            image = resize_center_crop(item.image(), resolution)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{dataset.source}: {item.name} cannot be decoded: {exc}") from None
        arrays.append(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays))


@torch.no_grad()
def encode_dataset(
    pipe: FluxPipeline, pixels: torch.Tensor, prompts: Sequence[str], max_sequence_length: int
) -> EncodedDataset:
    """Latents and text embeddings for every image and prompt, each encoded on its own.

    One item at a time, so an item's encoding never depends on what else is in the dataset.
    """
    latents = torch.cat([encode_latents(pipe, pixels[i : i + 1]) for i in range(len(pixels))])
    texts = [encode_prompts(pipe, prompt, max_sequence_length) for prompt in prompts]
    prompt_embeds = torch.cat([t[0] for t in texts])
    pooled = torch.cat([t[1] for t in texts])
    return EncodedDataset(
        latents=latents,
        prompt_embeds=prompt_embeds,
        pooled=pooled,
        text_ids=texts[0][2],
        img_ids=image_ids(pipe, latents.shape[2], latents.shape[3]),
    )


@torch.no_grad()
def encode_latents(pipe: FluxPipeline, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE latent mean, normalised as the pipeline's decode step expects (inverse of its scaling)."""
    vae = pipe.vae
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def encode_prompts(
    pipe: FluxPipeline, prompts: str | list[str], max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """T5 embeddings, pooled CLIP embeddings and text ids, as FluxPipeline computes them."""
    return pipe.encode_prompt(
        prompt=prompts, prompt_2=None, device=pipe.transformer.device, max_sequence_length=max_sequence_length
    )


def image_ids(pipe: FluxPipeline, height: int, width: int) -> torch.Tensor:
    transformer = pipe.transformer
    return FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, transformer.device, transformer.dtype)


def flow_matching_loss(
    pipe: FluxPipeline,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    text_ids: torch.Tensor,
    img_ids: torch.Tensor,
    guidance: float,
    per_image: bool = True,
) -> torch.Tensor:
    """Mean squared error of the predicted flow `noise - x0` at noise levels `sigmas`.

    One value per image, or with `per_image=False` the batch mean as one fused op (training).
    """
    transformer = pipe.transformer
    batch, channels, height, width = x0.shape
    # Not transformer.device/.dtype: diffusers computes those by walking every module, which
    # costs more per step than the tiny profile's whole optimizer update.
    weight = next(transformer.parameters())
    device, dtype = weight.device, weight.dtype
    x0 = x0.to(device, dtype)
    noise = noise.to(device, dtype)
    s = sigmas.to(device, dtype).view(-1, 1, 1, 1)
    noisy = (1.0 - s) * x0 + s * noise
    packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
    target = FluxPipeline._pack_latents(noise - x0, batch, channels, height, width)
    guidance_vec = torch.full((batch,), guidance, device=device, dtype=torch.float32)
    prediction = transformer(
        hidden_states=packed,
        timestep=sigmas.to(device, dtype),  # the pipeline passes t / 1000, i.e. sigma
        guidance=guidance_vec if transformer.config.guidance_embeds else None,
        pooled_projections=pooled.to(device, dtype),
        encoder_hidden_states=prompt_embeds.to(device, dtype),
        txt_ids=text_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]
    if not per_image:
        return torch.nn.functional.mse_loss(prediction.float(), target.float())
    return ((prediction.float() - target.float()) ** 2).mean(dim=(1, 2))


def _batch_indices(run: _Run, step: int) -> list[int]:
    """Images of step `step`: consecutive slots in a stream of per-epoch shuffles."""
    count = len(run.dataset)
    size = run.config.batch_size
    indices = []
    for slot in range(step * size, (step + 1) * size):
        epoch = slot // count
        order = run._epochs.get(epoch)
        if order is None:
            generator = torch.Generator("cpu").manual_seed(derived_seed(run.config.seed, "epoch", epoch))
            order = run._epochs[epoch] = torch.randperm(count, generator=generator).tolist()
            run._epochs.pop(epoch - 2, None)
        indices.append(order[slot % count])
    return indices


def _train_step(run: _Run) -> float:
    config = run.config
    step = run.step
    indices = _batch_indices(run, step)
    generator = torch.Generator("cpu").manual_seed(derived_seed(config.seed, "step", step))
    if run.encoded is not None:
        encoded = run.encoded
        index = torch.tensor(indices)
        x0, embeds, pooled = encoded.latents[index], encoded.prompt_embeds[index], encoded.pooled[index]
        text_ids, img_ids = encoded.text_ids, encoded.img_ids
    else:
        # Benchmark mode: encode this batch now. Latents one image at a time, as the cache does
        # (a batched VAE pass differs in the last bits); the text encoders give the same bits
        # batched, which the benchmark checks by comparing the files.
        assert run.pixels is not None
        x0 = torch.cat([encode_latents(run.pipe, run.pixels[i : i + 1]) for i in indices])
        embeds, pooled, text_ids = encode_prompts(run.pipe, [run.prompts[i] for i in indices], run.max_sequence_length)
        img_ids = image_ids(run.pipe, x0.shape[2], x0.shape[3])
    noise = torch.randn(tuple(x0.shape), generator=generator, dtype=torch.float32)
    if config.timestep_sampling == "logit_normal":
        sigmas = torch.sigmoid(torch.randn(len(indices), generator=generator, dtype=torch.float32))
    else:
        sigmas = torch.rand(len(indices), generator=generator, dtype=torch.float32)
    loss = flow_matching_loss(
        run.pipe, x0, noise, sigmas, embeds, pooled, text_ids, img_ids, config.guidance, per_image=False
    )
    value = float(loss.item())
    if not math.isfinite(value):
        raise TrainingError(
            f"the loss became {value} at step {step + 1}: training diverged and no LoRA was written; "
            f"lower the learning rate (now {config.lr:g})"
        )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.trainable, config.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.losses.append(value)
    run.step += 1
    return value


# ---------------------------------------------------------------------------------------------
# Files: the LoRA, its metadata, checkpoints. Written by hand so the header is byte-stable:
# safetensors' own writer emits metadata keys in a random (hash map) order in every process.


def lora_metadata(run: _Run) -> dict[str, str]:
    """The provenance recorded in the LoRA's safetensors header (all values are strings)."""
    config = run.config
    return {
        f"{META}format_version": FORMAT_VERSION,
        f"{META}profile": config.profile,
        f"{META}fingerprint": run.fingerprint,
        f"{META}rank": str(config.rank),
        f"{META}alpha": repr(float(config.alpha)),
        # The alpha / rank scale is multiplied into lora_B, so any loader (with or without our
        # metadata, ours or stock diffusers) applies the LoRA at the strength it was trained at.
        f"{META}alpha_applied_to_weights": "true",
        f"{META}targets": json.dumps(list(config.targets)),
        f"{META}steps": str(run.step),
        f"{META}planned_steps": str(config.steps),
        f"{META}seed": str(config.seed),
        f"{META}lr": repr(float(config.lr)),
        f"{META}batch_size": str(config.batch_size),
        f"{META}resolution": str(config.resolution),
        f"{META}timestep_sampling": config.timestep_sampling,
        f"{META}guidance": repr(float(config.guidance)),
        f"{META}dataset_sha256": run.dataset.sha256,
        f"{META}dataset_images": str(len(run.dataset)),
        f"{META}trigger": config.trigger or "",
    }


def write_lora(run: _Run, output: Path, metadata: dict[str, str]) -> str:
    """Write the diffusers-format LoRA with `metadata`; return the file's sha256."""
    from peft import get_peft_model_state_dict

    config = run.config
    layers = get_peft_model_state_dict(run.pipe.transformer, adapter_name=ADAPTER_NAME)
    scale = config.alpha / config.rank
    layers = {
        name: (tensor.detach().float().cpu() * scale if ".lora_B." in name and scale != 1.0 else tensor.detach())
        for name, tensor in layers.items()
    }
    for name, tensor in layers.items():
        if not bool(torch.isfinite(tensor).all()):
            raise TrainingError(f"LoRA weight {name} holds NaN or Inf values; training diverged, nothing written")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=output.parent, prefix=".lora-") as tmp:
            # Stock diffusers picks the key layout (transformer.<module>.lora_A.weight) ...
            FluxPipeline.save_lora_weights(tmp, transformer_lora_layers=layers, weight_name="lora.safetensors")
            with safe_open(Path(tmp, "lora.safetensors"), framework="pt") as saved:
                tensors = {key: saved.get_tensor(key) for key in saved.keys()}  # noqa: SIM118
            # ... and the header is ours: adapter config for stock loaders plus provenance.
            adapter = {
                "transformer.r": config.rank,
                "transformer.lora_alpha": config.rank,  # alpha / rank is already in lora_B
                "transformer.target_modules": list(config.targets),
            }
            header = {
                "format": "pt",
                "lora_adapter_metadata": json.dumps(adapter, sort_keys=True),
                **metadata,
            }
            staged = Path(tmp, "out.safetensors")
            write_safetensors(staged, tensors, header)
            os.replace(staged, output)
    except OSError as exc:
        raise TrainingError(f"cannot write {output}: {exc.strerror or exc}") from None
    return hashlib.sha256(output.read_bytes()).hexdigest()


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A .safetensors file whose bytes depend only on the tensors and metadata given.

    Tensors are stored in name order and the JSON header has sorted keys.
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        if tensor.dtype not in _DTYPES:
            raise TrainingError(f"cannot store tensor {name} of dtype {tensor.dtype}")
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for chunk in chunks:
            handle.write(chunk)


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a .safetensors header (empty if it has none)."""
    try:
        with safe_open(path, framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise TrainingError(f"{path}: not a readable safetensors file: {exc}") from None


# Checkpoints: LoRA weights, AdamW moments and the step, plus what must match to resume.
_IDENTITY_EXEMPT = {"steps"}  # a run may be resumed with more (or fewer) planned steps


def _identity(run: _Run) -> dict[str, Any]:
    config = run.config.model_dump(mode="json", exclude=_IDENTITY_EXEMPT)
    return {**config, "dataset_sha256": run.dataset.sha256, "fingerprint": run.fingerprint}


def _save_checkpoint(run: _Run, path: Path) -> None:
    tensors = {f"lora/{name}": param.detach() for name, param in run.params}
    names = {id(param): name for name, param in run.params}
    state = run.optimizer.state_dict()["state"]
    ordered = [param for _, param in run.params]
    for index, moments in state.items():
        name = names[id(ordered[index])]
        for key, value in moments.items():
            tensors[f"optim/{name}/{key}"] = torch.as_tensor(value)
    metadata = {
        f"{META}checkpoint_version": FORMAT_VERSION,
        f"{META}step": str(run.step),
        f"{META}identity": json.dumps(_identity(run), sort_keys=True),
        f"{META}losses": json.dumps(run.losses),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.name}.tmp")
        write_safetensors(staged, tensors, metadata)
        os.replace(staged, path)
    except OSError as exc:
        raise TrainingError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None


def _load_checkpoint(run: _Run, path: Path) -> None:
    if not path.is_file():
        raise TrainingError(f"checkpoint {path} does not exist")
    metadata = read_metadata(path)
    if metadata.get(f"{META}checkpoint_version") != FORMAT_VERSION:
        raise TrainingError(f"{path} is not a dippy-studio training checkpoint")
    try:
        saved_identity = json.loads(metadata[f"{META}identity"])
        step = int(metadata[f"{META}step"])
        losses = [float(v) for v in json.loads(metadata[f"{META}losses"])]
    except (KeyError, ValueError, TypeError) as exc:
        raise TrainingError(f"{path}: damaged checkpoint metadata ({exc})") from None
    identity = _identity(run)
    differences = [
        f"{key} {saved_identity.get(key)!r} (now {identity.get(key)!r})"
        for key in sorted(set(identity) | set(saved_identity))
        if identity.get(key) != saved_identity.get(key)
    ]
    if differences:
        raise TrainingError(f"{path} belongs to a different training run; it was made with " + ", ".join(differences))
    if step > run.config.steps:
        raise TrainingError(f"{path} is at step {step}, past the {run.config.steps} steps asked for")
    try:
        with safe_open(path, framework="pt") as handle:
            saved = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise TrainingError(f"{path}: unreadable checkpoint: {exc}") from None
    optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for index, (name, param) in enumerate(run.params):
            weights = saved.get(f"lora/{name}")
            if weights is None or weights.shape != param.shape:
                raise TrainingError(f"{path}: checkpoint lacks LoRA weight {name} or has the wrong shape")
            param.copy_(weights)
            moments = {key.rsplit("/", 1)[1]: value for key, value in saved.items() if key.startswith(f"optim/{name}/")}
            if moments:
                optimizer_state[index] = moments
    current = run.optimizer.state_dict()
    run.optimizer.load_state_dict({"state": optimizer_state, "param_groups": current["param_groups"]})
    run.step = step
    run.losses = losses
