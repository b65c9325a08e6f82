"""Input images of the image tasks (edit, img2img, inpaint) at submission.

A client gives an image (and, to inpaint, a mask) as an uploaded file, a `data:` URI or a URL
(fetched once, through the outbound guard). Whatever the source, the bytes as sent are bounded by
`max_input_image_bytes`, checked against the client's sha256 when given, and decoded once through
`protocol.images` (the one place input images are read: EXIF orientation, RGB, the profile's pixel
budget, bombs and animations refused). What is stored, in the assets store that miners download
from, is the canonical PNG of those pixels: every miner and every audit re-run reads the same.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from dippy_studio.orchestrator.errors import InvalidRequest, TooLarge
from dippy_studio.protocol.images import InputImageError, canonical_png, read_input_image, read_mask

if TYPE_CHECKING:
    from dippy_studio.orchestrator.blobs import BlobStore
    from dippy_studio.orchestrator.schemas import ImageRequest
    from dippy_studio.orchestrator.settings import OrchestratorSettings
    from dippy_studio.protocol.limits import ProfileLimits

# The public API's `task` -> the job kind that runs it. Text-to-image keeps its kind's old name.
TASK_KINDS: dict[str, str] = {"generate": "inference", "edit": "edit", "img2img": "img2img", "inpaint": "inpaint"}

# data:[<media type>][;parameters];base64,<data>: only base64 (an image is binary).
_DATA_URI = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*);base64,", re.IGNORECASE)


class InputContext(Protocol):
    """What reading a request's input images uses (the orchestrator service)."""

    settings: OrchestratorSettings
    assets: BlobStore

    def fetch(self, url: str, max_bytes: int, what: str) -> bytes: ...


@dataclass(frozen=True)
class StoredInputs:
    """A request's input image (and mask) as stored: canonical PNGs by sha256."""

    image_sha256: str
    size: tuple[int, int]  # the image's width and height, EXIF orientation applied
    mask_sha256: str | None = None


def decode_data_uri(uri: str, max_bytes: int, what: str) -> bytes:
    """The bytes of a base64 `data:` URI, refused (TooLarge) before decoding when they would be
    over `max_bytes` (the caller checks the decoded size)."""
    match = _DATA_URI.match(uri)
    if match is None:
        raise InvalidRequest(f"the {what} is not a base64 data: URI (data:image/png;base64,...)")
    encoded = uri[match.end() :].strip()
    if len(encoded) // 4 * 3 > max_bytes + 2:
        raise TooLarge(f"the {what} is over the {max_bytes}-byte limit")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"the {what}'s data: URI is not valid base64") from None
    if not data:
        raise InvalidRequest(f"the {what} is empty")
    return data


def input_bytes(
    ctx: InputContext, source: str | None, upload: bytes | None, sha256: str | None, what: str
) -> bytes | None:
    """The bytes the client sent for one input (an upload, a data: URI or a URL), or None when it
    sent none; checked against `sha256` when given."""
    limit = ctx.settings.max_input_image_bytes
    if upload is not None and source is not None:
        raise InvalidRequest(f"give the {what} once: as a file part or as a URL or data: URI, not both")
    if upload is not None:
        data = upload
    elif source is None:
        if sha256 is not None:
            raise InvalidRequest(f"'{what}_sha256' goes with '{what}'")
        return None
    elif source.startswith("data:"):
        data = decode_data_uri(source, limit, what)
    elif source.startswith(("http://", "https://")):
        data = ctx.fetch(source, limit, what)
    else:
        raise InvalidRequest(f"the {what} must be an http(s):// URL, a data: URI or an uploaded file")
    if len(data) > limit:
        raise TooLarge(f"the {what} is over the {limit}-byte limit")
    check_sha256(data, sha256, f"the {what}")
    return data


def check_sha256(data: bytes, expected: str | None, what: str) -> str:
    """The sha256 of what a client sent, which must be the one it gave, if it gave one."""
    actual = hashlib.sha256(data).hexdigest()
    if expected is not None and actual != expected:
        raise InvalidRequest(f"{what} has sha256 {actual}, not the {expected} given")
    return actual


def task_inputs(payload: Mapping[str, Any], image: Callable[[str], Any]) -> dict[str, Any]:
    """An image task's inputs as a job's payload keeps them: the task, the strength, and
    `image(sha256)` for the input image and the mask (a download for a miner, the bytes for an
    audit's re-run). None for text-to-image."""
    if "task" not in payload:
        return {}
    inputs: dict[str, Any] = {"task": payload["task"]}
    for name in ("image", "mask"):
        sha256 = payload.get(f"{name}_sha256")
        if sha256 is not None:
            inputs[name] = image(sha256)
    if payload.get("strength") is not None:
        inputs["strength"] = payload["strength"]
    return inputs


def store_inputs(ctx: InputContext, body: ImageRequest, limits: ProfileLimits) -> StoredInputs | None:
    """Read, check and store the request's image and mask; None for a task that takes none.
    Every refusal is an `InvalidRequest` (or `TooLarge`) that says what is wrong."""
    image = input_bytes(ctx, body.image, body.upload("image"), body.image_sha256, "image")
    mask = input_bytes(ctx, body.mask, body.upload("mask"), body.mask_sha256, "mask")
    if image is None and mask is not None:
        raise InvalidRequest("a mask needs an image")
    if image is None:
        return None
    try:
        picture = read_input_image(image, limits.max_input_pixels, "image")
        painted = read_mask(mask, picture.size, "mask") if mask is not None else None
    except InputImageError as exc:
        raise InvalidRequest(str(exc)) from None
    return StoredInputs(
        image_sha256=ctx.assets.put(canonical_png(picture)),
        size=picture.size,
        # At the image's size: the engine resizes it with the image (engine/inputs.py).
        mask_sha256=ctx.assets.put(canonical_png(painted)) if painted is not None else None,
    )
