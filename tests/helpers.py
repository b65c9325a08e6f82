"""Helpers shared by tests (tests/ is on sys.path, see pyproject.toml)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `dippy-studio ARGS` in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "dippy_studio.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def stock_png(pipe, request, max_sequence_length: int) -> bytes:
    """What a plain diffusers user gets for `request`: the stock FluxPipeline call, PNG-encoded."""
    import torch

    from dippy_studio.engine.images import encode_png

    with torch.inference_mode():
        image = pipe(
            request.prompt,
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            max_sequence_length=max_sequence_length,
        ).images[0]
    return encode_png(image)


def assert_within_one_level(a: bytes, b: bytes) -> None:
    """Two PNGs whose pixels differ by at most 1/255. Stock diffusers loading keeps safetensors'
    memory-mapped (unaligned) tensors, which can move the last float bits; after the engine's
    realignment its bytes are usually identical."""
    if a == b:
        return
    import io

    import numpy as np
    from PIL import Image

    first, second = (np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16) for png in (a, b))
    assert first.shape == second.shape and np.abs(first - second).max() <= 1


def framed_png(color: tuple[int, int, int]) -> bytes:
    """A 64x64 input image: `color` around a white square (64: FLUX.2 refuses smaller references)."""
    import io

    from PIL import Image

    image = Image.new("RGB", (64, 64), color)
    image.paste((255, 255, 255), (16, 16, 48, 48))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
