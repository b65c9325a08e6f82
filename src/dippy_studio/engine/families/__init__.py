"""Model families: what differs between Flux, SDXL, ... behind one small interface.

A family is one module that says how its pipelines are built (a built-in profile, in code) or
loaded (a local diffusers directory), which pipeline class serves each task, how a prompt
becomes the pipeline's text inputs, how denoised latents become pixels (the pipeline's own
arithmetic, so the engine can time each stage), how LoRAs apply and whether it trains them.
Everything else (profiles, fingerprints, determinism, the LoRA cache, staging and timings in
`Engine.generate`) is shared and lives outside this package.

A profile names its family in `protocol.limits.PROFILE_LIMITS` (`family`, default "flux").
"""

from __future__ import annotations

from dippy_studio.engine.errors import ProfileError
from dippy_studio.engine.families.base import Family
from dippy_studio.engine.families.flux import FLUX
from dippy_studio.engine.families.flux2 import FLUX2
from dippy_studio.engine.families.qwen_image import QWEN_IMAGE
from dippy_studio.engine.families.sdxl import SDXL
from dippy_studio.engine.families.zimage import ZIMAGE

FAMILIES: dict[str, Family] = {family.name: family for family in (FLUX, SDXL, ZIMAGE, QWEN_IMAGE, FLUX2)}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ProfileError(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}") from None


__all__ = ["FAMILIES", "Family", "get_family"]
