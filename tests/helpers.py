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
