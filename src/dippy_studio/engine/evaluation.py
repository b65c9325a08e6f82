"""LoRA quality: held-out flow-matching loss with and without the LoRA.

A validator holds back some images of what the client asked for and measures how well the
delivered LoRA denoises them compared with the base model: the same training objective,
evaluated at fixed noise levels with fixed noise, so the number is deterministic and two
LoRAs for the same job can be compared. The LoRA is applied exactly as serving applies it
(the Engine's LoRA cache), so what is scored is what clients will get.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dippy_studio.engine.datasets import Dataset, load_dataset
from dippy_studio.engine.errors import LoraError, RequestError
from dippy_studio.engine.lora import LoraRef, read_lora
from dippy_studio.engine.profiles import EngineOptions, get_profile

if TYPE_CHECKING:
    from dippy_studio.engine.generation import Engine

from dippy_studio.engine.training import (
    META,
    EncodedDataset,
    TrainConfig,
    derived_seed,
    encode_dataset,
    flow_matching_loss,
    pixel_tensor,
    read_metadata,
)

DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class LoraEvaluation:
    base_loss: float
    lora_loss: float
    improvement: float  # (base - lora) / base: 0.3 means 30% lower held-out loss with the LoRA
    by_sigma: tuple[tuple[float, float, float], ...]  # (noise level, base loss, LoRA loss)
    images: int
    seeds: tuple[int, ...]
    sigmas: tuple[float, ...]
    resolution: int
    trigger: str | None
    guidance: float
    lora_sha256: str
    dataset_sha256: str
    fingerprint: str  # of the profile that evaluated
    lora_fingerprint: str | None  # of the profile the LoRA was trained on, if recorded

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def evaluate_lora(
    profile: Engine | EngineOptions | str,
    lora: Path,
    heldout_dataset: Dataset | Path,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    *,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    resolution: int | None = None,
    trigger: str | None = None,
    guidance: float | None = None,
    batch_size: int = 8,
) -> LoraEvaluation:
    """Mean flow-matching loss on `heldout_dataset` with and without `lora`, and the improvement.

    Every (seed, noise level, image) counts once. Resolution, trigger word and guidance
    default to what the LoRA's metadata records about its training, else the profile's
    training defaults. Pass a loaded `Engine` to evaluate on it (an auditor's reference engine:
    no model load per evaluation); options or a profile name build a fresh one.
    """
    from dippy_studio.engine import Engine

    given = profile if isinstance(profile, Engine) else None
    if given is not None:
        options = given.options
    else:
        options = EngineOptions(profile=profile) if isinstance(profile, str) else profile
    seeds = tuple(int(s) for s in seeds)
    sigmas = tuple(float(s) for s in sigmas)
    if not seeds:
        raise RequestError("evaluation needs at least one seed")
    if not sigmas or not all(0.0 < s <= 1.0 for s in sigmas):
        raise RequestError("noise levels must be in (0, 1]")
    if batch_size < 1:
        raise RequestError("batch_size must be at least 1")
    lora_file = read_lora(lora)  # refuses pickles, malformed files and non-finite weights
    metadata = _lora_metadata(lora)
    spec = get_profile(options.profile)
    if not spec.model_family.trains_loras:
        # The held-out loss is the Flux training objective; no other family has one here.
        raise RequestError(f"LoRA evaluation runs on Flux profiles only; {spec.name} is a {spec.family} model")
    resolution = resolution or _int(metadata, "resolution") or TrainConfig(profile=spec.name).resolution
    if not spec.min_side <= resolution <= spec.max_side or resolution % 16:
        raise RequestError(f"evaluation resolution {resolution} does not suit profile {spec.name}")
    if trigger is None:
        trigger = metadata.get(f"{META}trigger") or None
    if guidance is None:
        guidance = float(metadata.get(f"{META}guidance", TrainConfig(profile=spec.name).guidance))
    dataset = load_dataset(heldout_dataset) if isinstance(heldout_dataset, Path) else heldout_dataset

    engine = given or Engine(options)
    pipe = engine.pipe
    with engine.session():
        encoded = encode_dataset(
            pipe, pixel_tensor(dataset, resolution), dataset.captions(trigger), spec.max_sequence_length
        )
        noises = [_noise(encoded, seed) for seed in seeds]
        engine.loras.activate([])
        base = _losses(pipe, encoded, noises, sigmas, guidance, batch_size)
        engine.loras.activate([LoraRef(path=lora)])
        with_lora = _losses(pipe, encoded, noises, sigmas, guidance, batch_size)
        engine.loras.activate([])

    base_loss, lora_loss = float(base.mean()), float(with_lora.mean())
    by_sigma = tuple((sigma, float(base[:, k].mean()), float(with_lora[:, k].mean())) for k, sigma in enumerate(sigmas))
    return LoraEvaluation(
        base_loss=base_loss,
        lora_loss=lora_loss,
        improvement=(base_loss - lora_loss) / base_loss if base_loss > 0 else 0.0,
        by_sigma=by_sigma,
        images=len(dataset),
        seeds=seeds,
        sigmas=sigmas,
        resolution=resolution,
        trigger=trigger,
        guidance=guidance,
        lora_sha256=lora_file.sha256,
        dataset_sha256=dataset.sha256,
        fingerprint=engine.fingerprint,
        lora_fingerprint=metadata.get(f"{META}fingerprint"),
    )


def _noise(encoded: EncodedDataset, seed: int) -> torch.Tensor:
    """Fixed noise per (seed, image), independent of how many images there are."""
    shape = tuple(encoded.latents.shape[1:])
    draws = []
    for index in range(len(encoded.latents)):
        generator = torch.Generator("cpu").manual_seed(derived_seed(seed, "eval", index))
        draws.append(torch.randn(shape, generator=generator, dtype=torch.float32))
    return torch.stack(draws)


def _losses(
    pipe,
    encoded: EncodedDataset,
    noises: list[torch.Tensor],
    sigmas: tuple[float, ...],
    guidance: float,
    batch_size: int,
) -> np.ndarray:
    """Loss per (seed x image, noise level), batched in fixed chunks of the dataset order."""
    count = len(encoded.latents)
    rows = []
    for noise in noises:
        per_sigma = []
        for sigma in sigmas:
            chunks = []
            for start in range(0, count, batch_size):
                chunk = slice(start, min(count, start + batch_size))
                size = chunk.stop - chunk.start
                chunks.append(
                    flow_matching_loss(
                        pipe,
                        encoded.latents[chunk],
                        noise[chunk],
                        torch.full((size,), sigma, dtype=torch.float32),
                        encoded.prompt_embeds[chunk],
                        encoded.pooled[chunk],
                        encoded.text_ids,
                        encoded.img_ids,
                        guidance,
                    )
                )
            per_sigma.append(torch.cat(chunks).double().numpy())
        rows.append(np.stack(per_sigma, axis=1))
    return np.concatenate(rows, axis=0)


def _lora_metadata(path: Path) -> dict[str, str]:
    try:
        return read_metadata(path)
    except Exception as exc:  # read_lora already accepted the file; this is belt and braces
        raise LoraError(f"{path}: cannot read the safetensors header: {exc}") from None


def _int(metadata: dict[str, str], key: str) -> int | None:
    value = metadata.get(f"{META}{key}")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
