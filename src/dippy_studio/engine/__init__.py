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


from dippy_studio.engine.errors import EngineError, LoraError, ProfileError, RequestError
from dippy_studio.engine.generate import Engine, GenerationRequest, GenerationResult, Timings, generate
from dippy_studio.engine.lora import LoraRef
from dippy_studio.engine.profiles import PROFILES, EngineOptions

__all__ = [
    "PROFILES",
    "Engine",
    "EngineError",
    "EngineOptions",
    "GenerationRequest",
    "GenerationResult",
    "LoraError",
    "LoraRef",
    "ProfileError",
    "RequestError",
    "Timings",
    "generate",
]
