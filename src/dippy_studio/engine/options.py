"""Engine options: which profile to run and how. Light on purpose (no torch import), so
settings and command lines can build them cheaply."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineOptions(BaseModel):
    """How to build an engine: which profile, where its weights live, and how to run it."""

    model_config = ConfigDict(frozen=True)

    profile: str = "tiny"
    model_path: Path | None = None
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Thread count changes results on larger models, so it is fixed (and fingerprinted)
    # rather than taken from the machine's core count.
    threads: int = Field(default=2, ge=1, le=256)
    lora_cache_size: int = Field(default=8, ge=1, le=256)
    lora_dir: Path | None = None
    compile: bool = False
