"""The engine: model profiles, deterministic generation, and LoRAs. Knows nothing of HTTP."""

import os

# Set before diffusers/transformers are imported. Nothing is ever downloaded: any accidental
# hub access fails fast instead of hanging. The verbosity hides import-time notes about
# optional backends (torchvision) and adapter-loading chatter that operators cannot act on.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


import importlib
from typing import TYPE_CHECKING, Any

# Names are imported on first use (PEP 562): `from dippy_studio.engine.errors import ...` or
# `dippy-studio --help` should not pay for importing torch and diffusers.
_EXPORTS = {
    "EngineError": "errors",
    "LoraError": "errors",
    "ProfileError": "errors",
    "RequestError": "errors",
    "Engine": "generation",
    "GenerationRequest": "generation",
    "GenerationResult": "generation",
    "Timings": "generation",
    "LoraRef": "lora",
    "PROFILES": "profiles",
    "EngineOptions": "options",
}

__all__ = [  # noqa: RUF022 (kept in _EXPORTS order)
    "EngineError",
    "LoraError",
    "ProfileError",
    "RequestError",
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "Timings",
    "LoraRef",
    "PROFILES",
    "EngineOptions",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dippy_studio.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dippy_studio.engine.{_EXPORTS[name]}"), name)


if TYPE_CHECKING:
    from dippy_studio.engine.errors import EngineError, LoraError, ProfileError, RequestError
    from dippy_studio.engine.generation import Engine, GenerationRequest, GenerationResult, Timings
    from dippy_studio.engine.lora import LoraRef
    from dippy_studio.engine.options import EngineOptions
    from dippy_studio.engine.profiles import PROFILES
