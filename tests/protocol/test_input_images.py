"""Input images are decoded in one place, so the miner and the auditor see the same pixels
whatever the client sent."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from dippy_studio.protocol.images import InputImageError, canonical_png, read_input_image, read_mask


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_exif_orientation_is_applied_once():
    # A phone photo stored sideways: 40 wide, 20 high, with "rotate 90" in its EXIF.
    stored = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    image = read_input_image(encoded(stored, "JPEG", exif=exif), max_pixels=10_000)
    assert image.size == (20, 40) and image.mode == "RGB"
    # Its canonical PNG carries no orientation, so reading it again changes nothing.
    again = read_input_image(canonical_png(image), max_pixels=10_000)
    assert again.size == (20, 40) and again.tobytes() == image.tobytes()


def test_transparency_is_shown_on_white_and_every_format_becomes_the_same_pixels():
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert read_input_image(encoded(clear), max_pixels=64).getpixel((0, 0)) == (255, 255, 255)
    solid = Image.new("RGB", (8, 8), (10, 120, 240))
    palette = solid.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    lossless = [encoded(solid), encoded(solid, "WEBP", lossless=True), encoded(palette)]
    assert len({canonical_png(read_input_image(data, max_pixels=64)) for data in lossless}) == 1


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not an image", "not a PNG, JPEG or WebP"),
        (encoded(Image.new("RGB", (8, 8)), "GIF"), "not a PNG, JPEG or WebP"),
        (encoded(Image.new("RGB", (101, 100))), "over this model's 10000"),
        (encoded(Image.new("RGB", (64, 64)))[:-40], "truncated or corrupt"),
    ],
)
def test_unusable_images_are_refused_with_the_reason(data, reason):
    with pytest.raises(InputImageError, match=reason):
        read_input_image(data, max_pixels=10_000)


def test_an_animated_image_is_refused():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    data = encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:])
    with pytest.raises(InputImageError, match="animated"):
        read_input_image(data, max_pixels=10_000)


def test_a_decompression_bomb_is_refused_before_its_pixels_are_decoded(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputImageError, match="decompression bomb"):
        read_input_image(encoded(Image.new("L", (100, 100))), max_pixels=10**9)


def test_a_mask_must_be_its_images_size_and_is_read_as_grey():
    mask = read_mask(encoded(Image.new("RGB", (16, 8), (255, 255, 255))), (16, 8))
    assert mask.mode == "L" and mask.getpixel((0, 0)) == 255
    for size in ((8, 8), (64, 64)):
        with pytest.raises(InputImageError, match="must be the image's size, 16x8"):
            read_mask(encoded(Image.new("L", size)), (16, 8))
