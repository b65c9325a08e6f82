"""Engine options: which profile to run and how. Light on purpose (no torch import), so
settings and command lines can build them cheaply."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dippy_studio.protocol.limits import PROFILE_LIMITS

DEFAULT_ATTENTION_BACKEND = "native"


@dataclass(frozen=True)
class AttentionBackend:
    """One of diffusers' attention backends (`ModelMixin.set_attention_backend`) and what it needs."""

    description: str
    cuda_only: bool = False
    half_precision_only: bool = False


# The diffusers attention backends a profile may name. Left out on purpose: the "*_hub" backends
# (they download kernels from the Hugging Face hub, and nothing here is ever downloaded), and the
# NPU/XLA/varlen variants nothing here runs on.
ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "native": AttentionBackend("torch scaled_dot_product_attention; PyTorch picks the kernel"),
    "_native_math": AttentionBackend("torch scaled_dot_product_attention, math kernel only"),
    "_native_flash": AttentionBackend("torch SDPA flash kernel", cuda_only=True, half_precision_only=True),
    "_native_efficient": AttentionBackend("torch SDPA memory-efficient kernel", cuda_only=True),
    "_native_cudnn": AttentionBackend("torch SDPA cuDNN kernel", cuda_only=True, half_precision_only=True),
    "flash": AttentionBackend("flash-attn package (FlashAttention 2)", cuda_only=True, half_precision_only=True),
    "_flash_3": AttentionBackend(
        "FlashAttention 3 (Hopper, built from source)", cuda_only=True, half_precision_only=True
    ),
    "sage": AttentionBackend("sageattention package (8-bit, approximate)", cuda_only=True, half_precision_only=True),
    "xformers": AttentionBackend("xformers package, memory-efficient attention", cuda_only=True),
}


class EngineOptions(BaseModel):
    """How to build an engine: which profile, where its weights live, and how to run it."""

    model_config = ConfigDict(frozen=True)

    profile: str = "tiny"
    model_path: Path | None = None
    device: Literal["cpu", "cuda"] = "cpu"
    # None: the profile's default (`ProfileLimits.default_dtype`: bfloat16 for real models,
    # float32 for the built-ins). Kept unresolved so settings merged over a profile change follow it.
    dtype: Literal["float32", "bfloat16"] | None = None
    # Thread count changes results on larger models, so it is fixed (and fingerprinted)
    # rather than taken from the machine's core count.
    threads: int = Field(default=2, ge=1, le=256)
    lora_cache_size: int = Field(default=8, ge=1, le=256)
    lora_dir: Path | None = None
    compile: bool = False
    # Which attention kernel the denoiser runs (diffusers' attention dispatcher). Kernels sum in
    # different orders, so the backend is part of the fingerprint.
    attention_backend: str = DEFAULT_ATTENTION_BACKEND

    @property
    def run_dtype(self) -> Literal["float32", "bfloat16"]:
        """The dtype the engine runs in: the one asked for, else the profile's default."""
        if self.dtype is not None:
            return self.dtype
        limits = PROFILE_LIMITS.get(self.profile)
        return limits.default_dtype if limits is not None else "float32"

    @field_validator("attention_backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {value!r}; valid backends: {', '.join(ATTENTION_BACKENDS)}")
        return value

    @model_validator(mode="after")
    def _backend_fits(self) -> EngineOptions:
        backend = ATTENTION_BACKENDS[self.attention_backend]
        if backend.cuda_only and self.device != "cuda":
            raise ValueError(
                f"attention backend {self.attention_backend!r} runs on CUDA only (device is {self.device!r})"
            )
        if backend.half_precision_only and self.run_dtype == "float32":
            raise ValueError(f"attention backend {self.attention_backend!r} needs dtype bfloat16 (dtype is float32)")
        return self
