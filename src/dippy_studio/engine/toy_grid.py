"""The README's grid of toy pictures: `python -m dippy_studio.engine.toy_grid --out docs/toy-grid.png`.

One row per shape, one column per colour, each on a background colour of its own, drawn by the
`toy` profile through the engine as any request would be (same steps, same seeds every run).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from dippy_studio.engine.toy.data import COLOURS, SHAPES, SIZE, Scene

LABEL = 14  # pixels of caption text under each row


def grid_scenes() -> list[list[Scene]]:
    names = list(COLOURS)
    return [
        # A background 1..7 places further along the colours: never the object's own colour.
        [Scene(colour, shape, names[(i + 1 + (2 + 3 * row) % 7) % len(names)]) for i, colour in enumerate(names)]
        for row, shape in enumerate(SHAPES)
    ]


def render(scale: int = 2, seed: int = 0) -> Image.Image:
    from dippy_studio.engine import Engine, EngineOptions, GenerationRequest

    engine = Engine(EngineOptions(profile="toy", threads=1))
    rows = grid_scenes()
    cell = SIZE * scale
    sheet = Image.new("RGB", (cell * len(rows[0]), (cell + LABEL) * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        for c, scene in enumerate(row):
            result = engine.generate(GenerationRequest(prompt=scene.caption, seed=seed + c, width=SIZE, height=SIZE))
            picture = Image.open(io.BytesIO(result.png)).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(picture, (c * cell, r * (cell + LABEL)))
            draw.text((c * cell + 2, r * (cell + LABEL) + cell + 1), f"{scene.colour} / {scene.background}", fill=0)
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], prog="python -m dippy_studio.engine.toy_grid")
    parser.add_argument("--out", type=Path, default=Path("docs/toy-grid.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    render(seed=args.seed).save(args.out, optimize=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
