"""Engine overhead for edit: `Engine.generate(task="edit")` against a bare `FluxKontextPipeline`.

The bare variant is what a user of stock diffusers would write for the same edit: open the input
image with PIL, call `FluxKontextPipeline(...)(image=..., prompt=...)` with a seeded CPU generator
(at the requested size: `max_area` and `_auto_resize=False`, as the engine passes them), then the
same PNG encoding. It runs on a FluxKontextPipeline built from the engine's own components, with
one request, alternating with the engine, and both must produce identical PNG bytes; the ratio of
their median times is the engine's overhead (input checks, staging, timings, LoRA bookkeeping,
hashing). The method is bench_overhead's, for the edit task.

    .venv/bin/python bench/bench_edit.py            # tiny-kontext 64px and small 512px
    .venv/bin/python bench/bench_edit.py --quick    # fewer rounds
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import sys
from pathlib import Path

# Keep stray BLAS/OpenMP pools from oversubscribing the cores the engine pins (2 threads).
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np
import torch
from PIL import Image

from bench_overhead import COLUMNS, TARGET_OVERHEAD, Config, compare_with_bare
from common import BenchResult, NoProgress, Progress, environment
from dippy_studio.engine import Engine, EngineOptions, GenerationRequest
from dippy_studio.engine.images import encode_png

PROMPT = "turn the lighthouse into a windmill, keep the sky"
SEED = 1234


FULL = (
    Config("tiny-kontext", 64, 4, reps=40, warmup=3, budget_s=30),
    Config("small", 512, 8, reps=15, warmup=1, budget_s=240),
)
QUICK = (
    Config("tiny-kontext", 64, 4, reps=10, warmup=1, budget_s=10),
    Config("small", 512, 8, reps=3, warmup=1, budget_s=60),
)


def input_png(side: int) -> bytes:
    """A seeded photo-sized input: smooth gradients plus noise, so PNG decoding costs what a
    real picture's would."""
    rng = np.random.default_rng(SEED)
    ramp = np.linspace(0, 200, side)
    base = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, ramp[::-1]) / 2, np.full((side, side), 90)], -1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def bare_kontext(engine: Engine):
    """A stock FluxKontextPipeline on the engine's models (the same objects)."""
    from diffusers import FluxKontextPipeline

    accepted = inspect.signature(FluxKontextPipeline.__init__).parameters
    pipe = FluxKontextPipeline(**{k: v for k, v in engine.pipe.components.items() if k in accepted})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bare_edit(pipe, request: GenerationRequest, max_sequence_length: int) -> bytes:
    """Stock diffusers usage for one edit, then the engine's PNG encoding."""
    image = Image.open(io.BytesIO(request.image)).convert("RGB")
    output = pipe(
        image=image,
        prompt=request.prompt,
        height=request.height,
        width=request.width,
        max_area=request.width * request.height,
        _auto_resize=False,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        max_sequence_length=max_sequence_length,
    ).images[0]
    return encode_png(output)


def measure(config: Config, progress: Progress) -> dict:
    engine = Engine(EngineOptions(profile=config.profile, threads=config.threads))
    request = GenerationRequest(
        prompt=PROMPT,
        seed=SEED,
        width=config.side,
        height=config.side,
        steps=config.steps,
        guidance=engine.spec.default_guidance,
        task="edit",
        image=input_png(config.side),
    )
    bare_pipe = bare_kontext(engine)
    name = f"{config.profile} edit {config.side}x{config.side} {config.steps} steps"

    def bare() -> bytes:
        with torch.inference_mode():
            return bare_edit(bare_pipe, request, engine.spec.max_sequence_length)

    return compare_with_bare(config, name, engine, request, bare, progress, description=f"edit overhead: {name}")


def run(configs: tuple[Config, ...] = FULL, progress: Progress | None = None) -> BenchResult:
    progress = progress or NoProgress()
    result = BenchResult(
        name="edit",
        title=f"Engine overhead for edit (target: at most {TARGET_OVERHEAD:.0%} on small)",
        columns=COLUMNS,
    )
    for config in configs:
        result.rows.append(measure(config, progress))
    result.notes.append(
        "engine = Engine.generate(task=edit); bare = PIL open + FluxKontextPipeline(image, prompt, ...).images[0]"
        " + the same PNG encoding; medians"
    )
    result.notes.append("ratio = median(engine) / median(bare); paired ratio = median of per-round ratios")
    return result


def main(argv: list[str] | None = None) -> int:
    import dataclasses

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    from run import table  # bench/run.py renders every benchmark's table the same way

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--threads", type=int, metavar="N", help="engine threads instead of the profiles' 2")
    parser.add_argument("--only", choices=["tiny-kontext", "small"], help="one configuration")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    configs = QUICK if args.quick else FULL
    if args.only:
        configs = tuple(c for c in configs if c.profile == args.only)
    if args.threads is not None:
        configs = tuple(dataclasses.replace(c, threads=args.threads) for c in configs)
    console = Console()
    if not console.is_terminal:
        console.width = 200
    progress = RichProgress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    with progress:
        result = run(configs, progress)
    console.print(table(result))
    for check in result.failed_checks:
        console.print(f"[red]check failed[/] {check}")
    if args.json:
        report = {"command": " ".join(sys.argv), "environment": environment(), "benchmarks": [result.as_dict()]}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if result.failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
