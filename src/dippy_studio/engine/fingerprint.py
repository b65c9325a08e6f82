"""Profile fingerprints: a short id over everything that decides output bits.

Two engines with equal fingerprints produce byte-identical PNGs for the same request; that
is what lets an auditor re-run a miner's job and compare hashes. Anything that can change a
bit belongs in `FingerprintParts`; anything that cannot (file paths, load time) stays out.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import diffusers
import PIL
import torch
import transformers
from diffusers import FluxPipeline
from PIL import features

from dippy_studio.engine.options import DEFAULT_ATTENTION_BACKEND


@dataclass(frozen=True)
class FingerprintParts:
    profile: str
    weights_sha256: str
    config_sha256: str
    dtype: str
    device: str
    threads: int
    lora_mode: str
    compile: bool
    cpu_capability: str
    torch: str
    diffusers: str
    transformers: str
    pillow: str
    zlib: str
    attention_backend: str = DEFAULT_ATTENTION_BACKEND

    @property
    def id(self) -> str:
        parts = asdict(self)
        # Left out at its default so that fingerprints from before the option existed (all of
        # them "native": torch SDPA) keep their ids.
        if parts["attention_backend"] == DEFAULT_ATTENTION_BACKEND:
            del parts["attention_backend"]
        canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, object]:
        return {"fingerprint": self.id, **asdict(self)}


FLUX_MODELS = ("transformer", "text_encoder", "text_encoder_2", "vae")


def weights_sha256(pipe: FluxPipeline, components: Sequence[str] = FLUX_MODELS) -> str:
    """sha256 over every tensor of the pipeline's models (its family's `model_components`, in
    that order): name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for component in components:
        state = getattr(pipe, component).state_dict()
        for name in sorted(state):
            tensor = state[name].detach().to("cpu").contiguous()
            header = f"{component}.{name}|{tensor.dtype}|{tuple(tensor.shape)}\n"
            digest.update(header.encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too (BatchNorm counts)
    return digest.hexdigest()


def config_sha256(pipe: FluxPipeline, max_sequence_length: int) -> str:
    """sha256 over the non-weight inputs to generation: scheduler, tokenizers (every pipeline
    component named tokenizer*, whatever the family; a processor's own tokenizer where the
    component is a processor, as FLUX.2 [dev]'s is), sequence length."""
    payload = {
        # Keys starting with "_" are bookkeeping (e.g. an unordered list of defaulted fields).
        "scheduler": {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
        "max_sequence_length": max_sequence_length,
        "vae_scale_factor": pipe.vae_scale_factor,
    }
    for name, part in pipe.components.items():
        if name.startswith("tokenizer") and part is not None:
            payload[name] = sorted(getattr(part, "tokenizer", part).get_vocab().items())
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def device_kind(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        return f"cuda:{name}:sm{major}{minor}:cuda{torch.version.cuda}"
    return "cpu"


def runtime_parts() -> dict[str, str]:
    """Versions and CPU features of this process that can change output bits."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "zlib": features.version("zlib") or zlib.ZLIB_RUNTIME_VERSION,
    }
