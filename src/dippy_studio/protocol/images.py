"""Input images for the image tasks (edit, img2img, inpaint): the one place they are decoded.

The orchestrator reads a client's image with `read_input_image` at submission, refuses what it
cannot use, and stores `canonical_png` of the result: RGB pixels with the EXIF orientation
applied, in a PNG whose bytes follow from the pixels alone. Miners and the auditor receive that
PNG and read it through the same function (a no-op on a canonical PNG), so every re-run sees the
same pixels whatever the client sent (JPEG, WebP, a rotated phone photo, a palette PNG).
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

# What clients may send. PNG is also what the orchestrator passes on.
INPUT_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})


class InputImageError(ValueError):
    """The image cannot be used; the message says why, for the client."""


def _open(data: bytes, what: str, max_pixels: int) -> Image.Image:
    # Pillow's own bomb guard (MAX_IMAGE_PIXELS) warns at its limit and raises at twice it; both
    # are refusals here, and our budget (never above Pillow's) is checked from the header before
    # any pixel is decoded.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=sorted(INPUT_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputImageError(f"the {what} has too many pixels (a decompression bomb?)") from None
    except UnidentifiedImageError:
        # Its message names an in-memory file object (an address), useless to a client.
        raise InputImageError(f"the {what} is not a PNG, JPEG or WebP image we can read") from None
    except (OSError, ValueError) as exc:
        raise InputImageError(f"the {what} is not a PNG, JPEG or WebP image we can read ({exc})") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InputImageError(f"the {what} is empty ({width}x{height})")
    if width * height > max_pixels:
        raise InputImageError(
            f"the {what} is {width}x{height} = {width * height} pixels, over this model's {max_pixels}"
        )
    if getattr(image, "n_frames", 1) > 1:
        raise InputImageError(f"the {what} is animated ({image.n_frames} frames); send a single frame")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputImageError(f"the {what} is truncated or corrupt ({exc})") from None
    return image


def read_input_image(data: bytes, max_pixels: int, what: str = "image") -> Image.Image:
    """The image's pixels as the models see them: EXIF orientation applied, converted to RGB
    (transparency composited on white, as a viewer shows it). Raises InputImageError."""
    image = _open(data, what, max_pixels)
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def read_mask(data: bytes, size: tuple[int, int], what: str = "mask") -> Image.Image:
    """A mask for inpainting as 8-bit grey (white: repaint, black: keep), the size of its image.
    Raises InputImageError."""
    # Any size passes the budget so that a wrong size is reported as such; it is refused next.
    image = _open(data, what, max(4 * size[0] * size[1], 1 << 20))
    image = ImageOps.exif_transpose(image) or image
    if image.size != size:
        raise InputImageError(
            f"the {what} is {image.size[0]}x{image.size[1]}; it must be the image's size, {size[0]}x{size[1]}"
        )
    # Brightness alone decides; transparency is ignored (a mask is painted, not cut out).
    return image.convert("L")


def canonical_png(image: Image.Image) -> bytes:
    """PNG bytes that follow from the pixels alone (no metadata, fixed compression), so the same
    pixels always get the same sha256."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()
