"""The input image and mask of an image task (edit, img2img, inpaint), as the pipelines get them.

Bytes are decoded by `protocol.images` (the one decoder the orchestrator uses too), then resized
here, once, to the output size: the pipelines receive an image that is already width x height,
so none of their own resizing (Kontext's preferred resolutions, the VAE processor's rounding)
ever changes what the model sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from dippy_studio.engine.errors import RequestError
from dippy_studio.protocol.images import InputImageError, read_input_image, read_mask

# The one resize of an input image (and of a mask given at the input's size). LANCZOS is what
# diffusers' own image processor uses, so a stock pipeline fed the original gets similar pixels.
RESAMPLE = Image.Resampling.LANCZOS


@dataclass(frozen=True)
class TaskImages:
    """The pixels one image task runs on: RGB `image` and, for inpainting, an "L" `mask`
    (white: repaint), both exactly the output size."""

    image: Image.Image
    mask: Image.Image | None = None


def fit_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` at exactly `size` (width, height). The caller's output size normally keeps the
    input's aspect ratio (`ProfileLimits.output_size`); an explicit other one stretches it."""
    return image if image.size == size else image.resize(size, RESAMPLE)


def read_task_images(image: bytes, mask: bytes | None, size: tuple[int, int], max_pixels: int) -> TaskImages:
    """Decode and resize the inputs of an image task; RequestError says why they are unusable.

    A mask may be the size of the input image as sent (it is then resized with it) or the output
    size; any other size is refused."""
    try:
        original = read_input_image(image, max_pixels, "input image")
        fitted = fit_to(original, size)
        if mask is None:
            return TaskImages(fitted)
        return TaskImages(fitted, _read_mask(mask, original.size, size))
    except InputImageError as exc:
        raise RequestError(str(exc)) from None


def _read_mask(data: bytes, input_size: tuple[int, int], size: tuple[int, int]) -> Image.Image:
    if input_size == size:
        return read_mask(data, size)
    try:
        return read_mask(data, size)
    except InputImageError:
        # Not the output size: it must then be the input's (whose message names that size).
        return fit_to(read_mask(data, input_size), size)
