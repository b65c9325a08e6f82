"""Image encoding. PNG bytes are what gets hashed, so encoding must be deterministic."""

from __future__ import annotations

import hashlib
import io

from PIL import Image


def encode_png(image: Image.Image) -> bytes:
    # No metadata, fixed compression level: PIL's PNG writer is then byte-deterministic.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
