"""Checks of what miners deliver: pure functions from the result's bytes to why it is not
acceptable (None when it is). Job kinds (`kinds`) pick theirs."""

from __future__ import annotations

import io
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# An image whose every channel spans at most this many levels is one flat colour: blank.
BLANK_RANGE = 2
_LORA_KEY = re.compile(r"^(?:transformer|text_encoder)\.(.+)\.(lora_A|lora_B)\.weight$")


def lora_id_for(job_id: str) -> str:
    """A training request's LoRA id, fixed by the request so a retried callback cannot make two."""
    return "lora_" + job_id.removeprefix("req_")


def check_image(data: bytes, width: int, height: int) -> str | None:
    """Why this is not an acceptable result image, or None: it must be a PNG that decodes, has
    the requested size and is not one flat colour."""
    if not data.startswith(PNG_SIGNATURE):
        return "not a PNG"
    try:
        with Image.open(io.BytesIO(data)) as image:
            # The size comes from the header: checked before decoding, so a huge image is never decoded.
            if image.size != (width, height):
                return f"image is {image.width}x{image.height}, the request was {width}x{height}"
            image.load()
            extrema = image.convert("RGB").getextrema()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"PNG does not decode: {exc}"
    if all(high - low <= BLANK_RANGE for low, high in extrema):
        return "image is blank (one flat colour)"
    return None


def read_lora_bytes(data: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The tensors of a .safetensors LoRA (refusing pickles, bad headers, non-finite or
    non-float values), or None and why not."""
    # Imported here: torch is needed only when a LoRA arrives.
    from dippy_studio.engine.errors import LoraError
    from dippy_studio.engine.lora import read_lora

    with tempfile.TemporaryDirectory(prefix="dippy-lora-") as tmp:
        path = Path(tmp) / "lora.safetensors"
        path.write_bytes(data)
        try:
            return read_lora(path, max_bytes=len(data) + 1).state_dict, None
        except LoraError as exc:
            return None, str(exc).replace(str(path), "LoRA")


def check_lora(data: bytes, rank: int | None = None, targets: Sequence[str] | None = None) -> str | None:
    """Why this is not the promised LoRA, or None: a diffusers-format Flux LoRA (what our miners
    train) of lora_A/lora_B pairs, of rank `rank` on exactly the `targets` modules when given."""
    tensors, problem = read_lora_bytes(data)
    if tensors is None:
        return problem
    found_targets: set[str] = set()
    for name, tensor in tensors.items():
        match = _LORA_KEY.match(name)
        if match is None:
            return f"unexpected tensor {name!r}: not a diffusers-format Flux LoRA"
        module, which = match.groups()
        if tensor.dim() != 2:
            return f"tensor {name!r} has shape {tuple(tensor.shape)}, expected a matrix"
        if targets is not None:
            target = next((t for t in targets if module == t or module.endswith("." + t)), None)
            if target is None:
                return f"tensor {name!r} is on a module outside the promised targets {list(targets)}"
            found_targets.add(target)
        tensor_rank = tensor.shape[0] if which == "lora_A" else tensor.shape[1]
        if rank is not None and tensor_rank != rank:
            return f"tensor {name!r} has rank {tensor_rank}, the request promised rank {rank}"
    missing = sorted(set(targets or ()) - found_targets)
    if missing:
        return f"no LoRA weights for promised targets {missing}"
    return None
