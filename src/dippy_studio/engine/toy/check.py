"""Does a picture show what its prompt says? Colour, shape and background from image moments.

The measure behind the toy model's quality bar, kept free of any model so it can be checked on
its own: it scores the training generator's pictures (`data.draw`) as matching their captions
and the same pictures under wrong captions as not.

- Background: the median colour of the picture's border.
- Object: the largest connected region of pixels far from the background colour.
- Colour: the vocabulary colour nearest to the object's median colour.
- Shape, from two moments that hold for a drawn shape of any size and position: a triangle
  (apex up) has its centre of mass two thirds of the way down its bounding box, a circle and a
  square half way; a square fills its bounding box, a circle pi/4 of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from skimage.measure import label

from dippy_studio.engine.toy.data import COLOURS, SHAPES, Scene

# Further than this (RGB distance) from the background colour is object. The vocabulary's
# closest pair is further apart than twice this.
OBJECT_DISTANCE = 60.0
MIN_OBJECT_FRACTION = 0.02  # a smaller region is a speck, not the object
# Between the ideal shapes' values (centre of mass at 2/3 or 1/2 of the height; fill pi/4 or 1),
# placed where the VAE's soft edges (rounded corners, blurred tips) still fall on the right side.
TRIANGLE_CENTRE_BELOW = 0.55
SQUARE_FILL_ABOVE = 0.87

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _NAMES], dtype=np.float64)


@dataclass(frozen=True)
class Observation:
    """What a picture shows, as the check reads it (None: no object found)."""

    colour: str | None
    shape: str | None
    background: str
    fill: float  # the object's share of its bounding box
    centre: float  # its centre of mass, as a fraction of the box height from the top
    rgb: tuple[float, float, float] | None  # the object's median colour

    def matches(self, scene: Scene) -> bool:
        """Colour and shape as the prompt says (the quality bar)."""
        return self.colour == scene.colour and self.shape == scene.shape


@dataclass(frozen=True)
class Score:
    """Fractions of samples whose observation matches the prompt."""

    samples: int
    colour: float
    shape: float
    background: float
    colour_and_shape: float

    def __str__(self) -> str:
        return (
            f"{self.samples} samples: colour and shape {self.colour_and_shape:.0%} "
            f"(colour {self.colour:.0%}, shape {self.shape:.0%}, background {self.background:.0%})"
        )


def nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def observe(image: Image.Image) -> Observation:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    far = np.sqrt(((pixels - background_rgb) ** 2).sum(axis=2)) > OBJECT_DISTANCE
    regions = label(far, connectivity=2)
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0  # the background label
    background = nearest_colour(background_rgb)
    if sizes.max() < MIN_OBJECT_FRACTION * far.size:
        return Observation(colour=None, shape=None, background=background, fill=0.0, centre=0.0, rgb=None)
    mask = regions == int(np.argmax(sizes))
    rows, cols = np.nonzero(mask)
    height = rows.max() - rows.min() + 1
    fill = float(mask.sum() / (height * (cols.max() - cols.min() + 1)))
    centre = float((rows.mean() - rows.min() + 0.5) / height)
    shape = "triangle" if centre > TRIANGLE_CENTRE_BELOW else "square" if fill > SQUARE_FILL_ABOVE else "circle"
    r, g, b = (float(v) for v in np.median(pixels[mask], axis=0))
    return Observation(
        colour=nearest_colour(np.array([r, g, b])),
        shape=shape,
        background=background,
        fill=fill,
        centre=centre,
        rgb=(r, g, b),
    )


def score(samples: Sequence[tuple[Scene, Image.Image]]) -> Score:
    """How often the pictures show their scenes."""
    if not samples:
        raise ValueError("no samples to score")
    seen = [(scene, observe(image)) for scene, image in samples]
    count = len(seen)

    def share(hits: int) -> float:
        return hits / count

    return Score(
        samples=count,
        colour=share(sum(o.colour == s.colour for s, o in seen)),
        shape=share(sum(o.shape == s.shape for s, o in seen)),
        background=share(sum(o.background == s.background for s, o in seen)),
        colour_and_shape=share(sum(o.matches(s) for s, o in seen)),
    )


def check_scenes(count: int = 48) -> list[Scene]:
    """A fixed spread of prompts: colours and shapes in turn, each colour on varied backgrounds."""
    names = list(COLOURS)
    scenes = []
    for index in range(count):
        colour = index % len(names)
        background = (colour + 1 + index % (len(names) - 1)) % len(names)  # never the colour itself
        scenes.append(Scene(names[colour], SHAPES[(index // len(names)) % len(SHAPES)], names[background]))
    return scenes
