"""Attention backends: pin a denoiser's attention layers to one named kernel.

diffusers routes the attention of its newer models (Flux, FLUX.2, Qwen-Image, Z-Image...) through
a dispatcher whose kernel can be chosen per model. Which kernel runs decides output bits, so the
engine always pins it from the profile's options, "native" included: otherwise the
DIFFUSERS_ATTN_BACKEND environment variable, or another model in the same process, could switch
it behind the fingerprint's back.
"""

from __future__ import annotations

from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import logging as diffusers_logging

from dippy_studio.engine.errors import ProfileError
from dippy_studio.engine.options import DEFAULT_ATTENTION_BACKEND


def dispatching_layers(model: ModelMixin) -> int:
    """How many of the model's attention processors go through diffusers' dispatcher (and so
    follow `set_attention_backend`). Older processors (SDXL's UNet) call torch SDPA directly."""
    return sum(1 for module in model.modules() if hasattr(getattr(module, "processor", None), "_attention_backend"))


def apply_attention_backend(model: ModelMixin, backend: str) -> None:
    """Run every dispatching attention layer of `model` with `backend`.

    Raises ProfileError when the backend cannot run here (its package is missing) or when the
    model has no dispatching layers and a backend other than "native" was asked for: that
    request would be silently ignored while the fingerprint claimed it."""
    if dispatching_layers(model) == 0:
        if backend != DEFAULT_ATTENTION_BACKEND:
            raise ProfileError(
                f"{type(model).__name__} does not route attention through diffusers' attention backends; "
                f"only {DEFAULT_ATTENTION_BACKEND!r} applies to it (asked for {backend!r})"
            )
        return
    # set_attention_backend also moves the process-wide default backend, which every model
    # without a pinned backend follows; put it back so this engine changes no other model.
    previous = _AttentionBackendRegistry._active_backend
    logger = diffusers_logging.get_logger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(diffusers_logging.ERROR)  # "attention backends are experimental", once per model
    try:
        model.set_attention_backend(AttentionBackendName(backend).value)
    except (RuntimeError, ValueError) as exc:
        raise ProfileError(f"attention backend {backend!r} cannot run here: {exc}") from exc
    finally:
        logger.setLevel(level)
        _AttentionBackendRegistry.set_active_backend(previous)
