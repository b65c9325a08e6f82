"""Checks of what miners and clients deliver: functions from the bytes to why they are not
acceptable (None when they are). Job kinds (`kinds`) pick theirs. The LoRA checks need torch,
so they run in the model-code child process (`model_code`)."""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from dippy_studio.orchestrator import model_code
from dippy_studio.orchestrator.audit import lora_shape, lora_shape_problem

log = logging.getLogger("dippy_studio.orchestrator.results")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# An image whose every channel spans at most this many levels is one flat colour: blank.
BLANK_RANGE = 2


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


def check_lora(data: bytes, rank: int | None, targets: Sequence[str] | None, *, time_limit: float) -> str | None:
    """Why this is not the promised LoRA, or None: a diffusers-format Flux LoRA (what our miners
    train) of rank `rank` on exactly the `targets` layers when given. The same shape rule as a
    training audit's (`audit.lora_shape_problem`), checked at delivery, in the model-code child
    process (`model_code`; `ModelCodeUnavailable` when it gives no answer within `time_limit`)."""
    return model_code.run(_check_lora, (data, rank, targets), time_limit)


def check_lora_fit(data: bytes, profile: str, model_path: Path | None, *, time_limit: float) -> str | None:
    """Why a client's LoRA cannot be used on `profile`, or None: it must read as a LoRA
    (`read_lora_bytes`), and every tensor must fit a layer of the profile's transformer or text
    encoder, shapes included: the check a miner's engine makes before it loads a LoRA
    (`engine.lora.lora_fit_problem`), made on the profile's layers without weights, in the
    model-code child process (`model_code`; `ModelCodeUnavailable` when it gives no answer within
    `time_limit`). The architecture of a profile that loads from a directory is read from
    `model_path`; without one only the first part is checked."""
    return model_code.run(_check_lora_fit, (data, profile, model_path), time_limit)


# What follows runs in the model-code child process: it imports torch.


def read_lora_bytes(data: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The tensors of a .safetensors LoRA (refusing pickles, bad headers, non-finite or
    non-float values), or None and why not."""
    from dippy_studio.engine.errors import LoraError
    from dippy_studio.engine.lora import read_lora

    with tempfile.TemporaryDirectory(prefix="dippy-lora-") as tmp:
        path = Path(tmp) / "lora.safetensors"
        path.write_bytes(data)
        try:
            return read_lora(path, max_bytes=len(data) + 1).state_dict, None
        except LoraError as exc:
            return None, str(exc).replace(str(path), "LoRA")


def _check_lora(data: bytes, rank: int | None, targets: Sequence[str] | None) -> str | None:
    tensors, problem = read_lora_bytes(data)
    if tensors is None:
        return problem
    try:
        shape = lora_shape({name: tuple(tensor.shape) for name, tensor in tensors.items()})
    except ValueError as exc:
        return str(exc)
    return lora_shape_problem(shape, rank, targets)


def _check_lora_fit(data: bytes, profile: str, model_path: Path | None) -> str | None:
    tensors, problem = read_lora_bytes(data)
    if tensors is None:
        return problem
    from dippy_studio.engine.errors import ProfileError
    from dippy_studio.engine.lora import lora_fit_problem
    from dippy_studio.engine.profiles import layer_models

    try:
        models = layer_models(profile, model_path)
    except ProfileError as exc:
        log.warning("LoRAs are not checked against the layers of %s: %s", profile, exc)
        return None
    return None if models is None else lora_fit_problem(models, tensors)
