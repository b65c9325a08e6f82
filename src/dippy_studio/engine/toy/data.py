"""The toy model's world: one shape of one colour on a plain background, with its caption.

A small fixed vocabulary (`COLOURS`, `SHAPES`) so a few-million-parameter model can learn all
of it on a CPU. The object's colour always differs from the background's, and each picture is
a pure function of (seed, index), so the training set is the same on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

SIZE = 64  # the resolution the toy model is trained at

# Far apart in RGB, so the nearest named colour of a drawn object is never ambiguous.
COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 40, 180),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# The words a caption is made of, beside the colour and shape names.
FILLER_WORDS: tuple[str, ...] = ("a", "on", "background")


@dataclass(frozen=True)
class Scene:
    """What one picture shows."""

    colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def random_scene(rng: np.random.Generator) -> Scene:
    colour, background = rng.choice(len(COLOURS), size=2, replace=False)
    names = list(COLOURS)
    return Scene(names[int(colour)], SHAPES[int(rng.integers(len(SHAPES)))], names[int(background)])


def draw(scene: Scene, rng: np.random.Generator, size: int = SIZE, centred: bool = False) -> Image.Image:
    """The scene with a random size and position of the object: anywhere in the middle half of
    the frame, 3/8 to 5/8 of it wide; or, `centred`, 7/16 to 9/16 wide and at most 1/16 of the
    frame off centre."""
    image = Image.new("RGB", (size, size), COLOURS[scene.background])
    if centred:
        extent = int(rng.integers(size * 7 // 16, size * 9 // 16 + 1))
        middle, jitter = (size - extent) // 2, size // 16
        x0, y0 = (middle + int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
    else:
        extent = int(rng.integers(size * 3 // 8, size * 5 // 8 + 1))
        slack = size - extent
        x0 = int(rng.integers(slack // 4, slack - slack // 4 + 1))
        y0 = int(rng.integers(slack // 4, slack - slack // 4 + 1))
    box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
    fill = COLOURS[scene.colour]
    canvas = ImageDraw.Draw(image)
    if scene.shape == "circle":
        canvas.ellipse(box, fill=fill)
    elif scene.shape == "square":
        canvas.rectangle(box, fill=fill)
    elif scene.shape == "triangle":
        canvas.polygon(
            [(x0, y0 + extent - 1), (x0 + (extent - 1) / 2, y0), (x0 + extent - 1, y0 + extent - 1)], fill=fill
        )
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; shapes: {', '.join(SHAPES)}")
    return image


def samples(count: int, seed: int, size: int = SIZE, centred: bool = False) -> list[tuple[Scene, Image.Image]]:
    """`count` seeded (scene, picture) pairs: the same on every machine for the same arguments."""
    rng = np.random.Generator(np.random.PCG64(seed))
    items = []
    for _ in range(count):
        scene = random_scene(rng)
        items.append((scene, draw(scene, rng, size, centred)))
    return items


def gold_style(count: int = 8, seed: int = 11) -> list[tuple[str, Image.Image]]:
    """A style the toy model never saw: (caption, picture) pairs whose object is drawn yellow
    whatever colour its caption names. A LoRA trained on it turns the model's objects yellow and
    keeps their shapes, a change `check.observe` measures (the demo trains one; so do the tests)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    colours, backgrounds = ("red", "green", "blue", "purple"), ("black", "cyan", "white", "blue", "red", "green")
    pairs = []
    for index in range(count):
        shape, colour = SHAPES[index % 3], colours[index % 4]
        background = backgrounds[index % 6] if backgrounds[index % 6] != colour else "black"
        picture = draw(Scene("yellow", shape, background), rng, centred=True)
        pairs.append((Scene(colour, shape, background).caption, picture))
    return pairs
