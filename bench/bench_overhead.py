"""Engine overhead: `Engine.generate()` against a bare diffusers call on the same pipeline.

The bare variant is what a user of stock diffusers would write: `pipe(prompt, ...)` with a
seeded CPU generator, then the same PNG encoding. Both variants run on one pipeline object
with one request, alternating, and must produce identical PNG bytes; the ratio of their
median times is the engine's overhead (staging, timings, LoRA bookkeeping, hashing).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from common import (
    BenchResult,
    Column,
    NoProgress,
    Progress,
    interleave,
    median_ms,
    paired_ratio,
)
from dippy_studio.engine import Engine, EngineOptions, GenerationRequest
from dippy_studio.engine.images import encode_png

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SEED = 1234
TARGET_OVERHEAD = 0.05  # on the small profile


@dataclass(frozen=True)
class Config:
    profile: str
    side: int
    steps: int
    reps: int
    warmup: int
    budget_s: float | None = None  # stop early on a busy machine (see common.interleave)
    threads: int = 2  # the profiles' pin; 1 is steadier on a machine other jobs keep busy


FULL = (
    Config("tiny", 64, 4, reps=40, warmup=3, budget_s=30),
    Config("small", 512, 8, reps=15, warmup=1, budget_s=120),
)
QUICK = (
    Config("tiny", 64, 4, reps=10, warmup=1, budget_s=10),
    Config("small", 512, 8, reps=3, warmup=1, budget_s=30),
)

COLUMNS = [
    Column("config", "config"),
    Column("ours_ms", "engine ms", "{:.1f}"),
    Column("bare_ms", "bare ms", "{:.1f}"),
    Column("ratio", "ratio", "{:.3f}"),
    Column("paired_ratio", "paired ratio", "{:.3f}"),
    Column("overhead_pct", "overhead", "{:+.1f}%"),
    Column("target", "target"),
    Column("identical", "same PNG"),
    Column("threads", "threads"),
    Column("reps", "reps"),
]


def bare_generate(pipe, request: GenerationRequest, max_sequence_length: int) -> bytes:
    """Stock diffusers usage, then the engine's PNG encoding."""
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


def measure(config: Config, progress: Progress) -> dict:
    engine = Engine(EngineOptions(profile=config.profile, threads=config.threads))
    request = GenerationRequest(prompt=PROMPT, seed=SEED, width=config.side, height=config.side, steps=config.steps)
    name = f"{config.profile} {config.side}x{config.side} {config.steps} steps"

    def bare() -> bytes:
        return bare_generate(engine.pipe, request, engine.spec.max_sequence_length)

    return compare_with_bare(config, name, engine, request, bare, progress, description=f"overhead: {name}")


def compare_with_bare(
    config: Config,
    name: str,
    engine: Engine,
    request: GenerationRequest,
    bare: Callable[[], bytes],
    progress: Progress,
    description: str,
) -> dict:
    """Time `engine.generate(request)` against `bare()` alternately; the row of medians, their
    ratios, and whether every round gave identical PNGs (both must do the same work)."""
    stages: list[dict[str, float]] = []
    mismatches: list[int] = []

    def ours() -> bytes:
        result = engine.generate(request)
        stages.append(result.timings.as_dict())
        return result.png

    def compare(outputs: dict[str, bytes]) -> None:
        if outputs["ours"] != outputs["bare"]:
            mismatches.append(len(stages))

    seconds = interleave(
        {"ours": ours, "bare": bare},
        reps=config.reps,
        warmup=config.warmup,
        progress=progress,
        description=description,
        on_round=compare,
        budget_s=config.budget_s,
    )
    ours_ms, bare_ms = median_ms(seconds["ours"]), median_ms(seconds["bare"])
    ratio = ours_ms / bare_ms
    timed_stages = stages[config.warmup :] or stages
    row = {
        "config": name,
        "profile": config.profile,
        "ours_ms": ours_ms,
        "bare_ms": bare_ms,
        "ratio": ratio,
        "paired_ratio": paired_ratio(seconds["ours"], seconds["bare"]),
        "overhead_pct": (ratio - 1) * 100,
        "target": "-",
        "identical": not mismatches,
        "threads": config.threads,
        "reps": len(seconds["ours"]),
        "load_average_1m": os.getloadavg()[0],  # other jobs on the machine while this ran
        "warmup": config.warmup,
        "ours_min_ms": min(seconds["ours"]) * 1e3,
        "bare_min_ms": min(seconds["bare"]) * 1e3,
        "ours_s": seconds["ours"],
        "bare_s": seconds["bare"],
        "engine_stage_median_ms": {
            stage: statistics.median(s[stage] for s in timed_stages) * 1e3 for stage in timed_stages[0]
        },
    }
    if config.profile == "small":
        row["target"] = "met" if ratio - 1 <= TARGET_OVERHEAD else "missed"
    return row


def run(configs: tuple[Config, ...] = FULL, progress: Progress | None = None) -> BenchResult:
    progress = progress or NoProgress()
    result = BenchResult(
        name="overhead",
        title=f"Engine overhead (target: at most {TARGET_OVERHEAD:.0%} on small)",
        columns=COLUMNS,
    )
    for config in configs:
        result.rows.append(measure(config, progress))
    result.notes.append(
        "engine = Engine.generate(); bare = pipe(prompt, ...).images[0] + the same PNG encoding; medians"
    )
    result.notes.append("ratio = median(engine) / median(bare); paired ratio = median of per-round ratios")
    return result
