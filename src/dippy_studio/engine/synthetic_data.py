"""Synthetic image datasets: seeded coloured shapes (and noise textures) with captions.

Used by the tests, the training benchmark and the demo, where no real photos exist. Each
style is a distinct image distribution, so a LoRA trained on one style should fit held-out
images of that style better than the base model does, and not images of another style.

Datasets are written in the trainer's input convention: `name.png` + `name.txt` captions,
as a folder or a .zip. The same (style, count, seed, size) always gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dippy_studio.engine.datasets import zip_bytes
from dippy_studio.engine.images import encode_png

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class ShapeStyle:
    """A family of images: a background colour, shape colours and shape kinds."""

    name: str
    background: tuple[str, RGB]
    colours: tuple[tuple[str, RGB], ...]
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    max_shapes: int = 3
    noise: bool = False


STYLES: dict[str, ShapeStyle] = {
    style.name: style
    for style in (
        ShapeStyle(
            name="sunset",
            background=("navy", (18, 24, 72)),
            colours=(("orange", (250, 140, 20)), ("red", (220, 40, 40)), ("yellow", (250, 220, 60))),
        ),
        ShapeStyle(
            name="meadow",
            background=("pale green", (190, 235, 180)),
            colours=(("purple", (120, 40, 160)), ("blue", (40, 80, 220)), ("teal", (20, 140, 140))),
            shapes=("square", "stripe"),
        ),
        ShapeStyle(name="noise", background=("grey", (128, 128, 128)), colours=(), shapes=(), noise=True),
    )
}


def shape_images(style: str, count: int, seed: int, size: int = 64) -> list[tuple[str, Image.Image, str]]:
    """`count` seeded (name, image, caption) triples of `style`; captions start with `[trigger]`."""
    spec = _style(style)
    rng = np.random.Generator(np.random.PCG64([seed, sum(spec.name.encode())]))
    items = []
    for index in range(count):
        image, caption = _draw(spec, rng, size)
        items.append((f"{spec.name}_{index:04d}", image, f"[trigger] {caption}"))
    return items


def write_dataset(
    path: Path,
    style: str = "sunset",
    count: int = 8,
    seed: int = 0,
    size: int = 64,
    captions: bool = True,
) -> Path:
    """Write a dataset as png+txt pairs: a .zip if `path` ends in .zip, otherwise a folder."""
    files: list[tuple[str, bytes]] = []
    for name, image, caption in shape_images(style, count, seed, size):
        files.append((f"{name}.png", encode_png(image)))
        if captions:
            files.append((f"{name}.txt", caption.encode()))
    if path.suffix.lower() == ".zip":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(zip_bytes(files))
    else:
        path.mkdir(parents=True, exist_ok=True)
        for name, data in files:
            (path / name).write_bytes(data)
    return path


def _style(name: str) -> ShapeStyle:
    try:
        return STYLES[name]
    except KeyError:
        raise ValueError(f"unknown synthetic style {name!r}; known: {', '.join(STYLES)}") from None


def _draw(spec: ShapeStyle, rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    if spec.noise:
        # Smooth-ish random texture: low-resolution noise upscaled, so it is not pure pixel noise.
        low = rng.integers(0, 256, size=(max(2, size // 8), max(2, size // 8), 3), dtype=np.uint8)
        image = Image.fromarray(low, "RGB").resize((size, size), Image.Resampling.BILINEAR)
        return image, "a random noise texture"
    bg_name, bg = spec.background
    image = Image.new("RGB", (size, size), _jitter(bg, rng))
    draw = ImageDraw.Draw(image)
    described = []
    for _ in range(int(rng.integers(1, spec.max_shapes + 1))):
        kind = spec.shapes[int(rng.integers(len(spec.shapes)))]
        colour_name, colour = spec.colours[int(rng.integers(len(spec.colours)))]
        extent = int(rng.integers(size // 5, size // 2))
        x0 = int(rng.integers(0, size - extent))
        y0 = int(rng.integers(0, size - extent))
        box = (x0, y0, x0 + extent, y0 + extent)
        fill = _jitter(colour, rng)
        if kind == "circle":
            draw.ellipse(box, fill=fill)
        elif kind == "square":
            draw.rectangle(box, fill=fill)
        elif kind == "triangle":
            draw.polygon([(x0, y0 + extent), (x0 + extent // 2, y0), (x0 + extent, y0 + extent)], fill=fill)
        else:  # stripe: a full-width horizontal band
            draw.rectangle((0, y0, size, y0 + max(2, extent // 3)), fill=fill)
        described.append(f"a {colour_name} {kind}")
    return image, f"{' and '.join(described)} on a {bg_name} background"


def _jitter(colour: RGB, rng: np.random.Generator, amount: int = 12) -> RGB:
    shift = rng.integers(-amount, amount + 1, size=3)
    r, g, b = (int(np.clip(c + s, 0, 255)) for c, s in zip(colour, shift, strict=True))
    return (r, g, b)
