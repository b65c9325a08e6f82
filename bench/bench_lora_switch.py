"""LoRA switching: the engine's adapter cache against loading and unloading per request.

A request stream cycles through N LoRAs. Ours keeps all of them loaded (cache capacity >= N)
and switching is `engine.loras.activate([ref])`. The naive stream runs on a second, separate
engine and does `pipe.load_lora_weights(path)` before each request and
`pipe.unload_lora_weights()` after it; its switch cost is the two together. Both streams
generate every request and their PNGs must match byte for byte.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

from common import BenchResult, Column, NoProgress, Progress, median_ms, over_budget, paired_ratio, timed
from dippy_studio.engine import Engine, EngineOptions, GenerationRequest, LoraRef
from dippy_studio.engine.synthetic import write_random_lora

PROMPT = "a watercolor fox in the snow"
TARGET_SPEEDUP = 10.0


@dataclass(frozen=True)
class Config:
    profile: str
    side: int
    steps: int
    cycles: int  # timed passes through all LoRAs, after one untimed pass that fills the cache
    loras: int = 8
    budget_s: float | None = None  # stop early on a busy machine (see common.interleave)
    threads: int = 2  # the profiles' pin; 1 is steadier on a machine other jobs keep busy


# Generation only proves the streams agree; small images keep it cheap next to the switch.
FULL = (Config("tiny", 64, 4, cycles=6, budget_s=40), Config("small", 64, 2, cycles=3, budget_s=40))
QUICK = (Config("tiny", 64, 4, cycles=2, budget_s=15), Config("small", 64, 2, cycles=1, budget_s=15))

COLUMNS = [
    Column("config", "config"),
    Column("ours_ms", "ours ms", "{:.2f}"),
    Column("naive_ms", "naive ms", "{:.2f}"),
    Column("naive_load_ms", "load", "{:.2f}"),
    Column("naive_unload_ms", "unload", "{:.2f}"),
    Column("speedup", "naive/ours", "{:.1f}x"),
    Column("paired_speedup", "paired", "{:.1f}x"),
    Column("target", "target"),
    Column("cold_ms", "cold ms", "{:.1f}"),
    Column("identical", "same PNG"),
    Column("threads", "threads"),
    Column("requests", "requests"),
]


def measure(config: Config, lora_dir: Path, progress: Progress) -> dict:
    options = EngineOptions(profile=config.profile, threads=config.threads, lora_cache_size=max(8, config.loras))
    ours, naive = Engine(options), Engine(options)
    paths = [
        write_random_lora(ours.pipe, lora_dir / f"{config.profile}-{i}.safetensors", seed=1000 + i)
        for i in range(config.loras)
    ]

    def request(i: int, loras: list[LoraRef]) -> GenerationRequest:
        side = config.side
        return GenerationRequest(prompt=PROMPT, seed=i, width=side, height=side, steps=config.steps, loras=loras)

    def ours_turn(i: int, path: Path) -> tuple[float, str]:
        ref = LoraRef(path=path)
        switch, _ = timed(lambda: ours.loras.activate([ref]))
        return switch, ours.generate(request(i, [ref])).sha256

    def naive_turn(i: int, path: Path) -> tuple[float, float, str]:
        load, _ = timed(lambda: naive.pipe.load_lora_weights(str(path), adapter_name=f"lora_{i % config.loras}"))
        sha = naive.generate(request(i, [])).sha256  # no LoRAs through the engine: it holds none
        unload, _ = timed(naive.pipe.unload_lora_weights)
        return load, unload, sha

    # One untimed pass: fills our cache (its misses are the cold-load cost) and warms the naive path.
    cold: list[float] = []
    for i, path in enumerate(paths):
        cold.append(ours_turn(i, path)[0])
        naive_turn(i, path)
    misses_after_fill = ours.loras.stats.misses

    total = config.cycles * config.loras
    ours_s: list[float] = []
    loads: list[float] = []
    unloads: list[float] = []
    mismatches: list[int] = []
    task = progress.add_task(f"lora switch: {config.profile}", total=total)
    started = perf_counter()
    for i in range(total):
        if over_budget(started, config.budget_s, done=i, wanted=total):
            break
        path = paths[i % config.loras]
        if i % 2 == 0:
            switch, ours_sha = ours_turn(i, path)
            load, unload, naive_sha = naive_turn(i, path)
        else:
            load, unload, naive_sha = naive_turn(i, path)
            switch, ours_sha = ours_turn(i, path)
        ours_s.append(switch)
        loads.append(load)
        unloads.append(unload)
        if ours_sha != naive_sha:
            mismatches.append(i)
        progress.advance(task)
    progress.remove_task(task)

    # The LoRAs must change the image, or matching hashes would prove nothing.
    base_sha = naive.generate(request(0, [])).sha256
    first_lora_sha = ours.generate(request(0, [LoraRef(path=paths[0])])).sha256

    naive_s = [load + unload for load, unload in zip(loads, unloads, strict=True)]
    ours_ms, naive_ms = median_ms(ours_s), median_ms(naive_s)
    speedup = naive_ms / ours_ms
    return {
        "config": f"{config.profile} x{config.loras} LoRAs {config.side}px {config.steps} steps",
        "profile": config.profile,
        "ours_ms": ours_ms,
        "naive_ms": naive_ms,
        "naive_load_ms": median_ms(loads),
        "naive_unload_ms": median_ms(unloads),
        "speedup": speedup,
        "paired_speedup": 1 / paired_ratio(ours_s, naive_s),
        "target": "met" if speedup >= TARGET_SPEEDUP else "missed",
        "cold_ms": median_ms(cold),
        "identical": not mismatches,
        "mismatched_requests": mismatches,
        "checks": {
            "lora_changes_image": base_sha != first_lora_sha,
            "all_switches_were_cache_hits": ours.loras.stats.misses == misses_after_fill,
        },
        "threads": config.threads,
        "requests": len(ours_s),
        "load_average_1m": os.getloadavg()[0],  # other jobs on the machine while this ran
        "lora_file_bytes": paths[0].stat().st_size,
        "ours_s": ours_s,
        "naive_load_s": loads,
        "naive_unload_s": unloads,
    }


def run(configs: tuple[Config, ...] = FULL, progress: Progress | None = None) -> BenchResult:
    progress = progress or NoProgress()
    result = BenchResult(
        name="lora_switch",
        title=f"LoRA switching (target: naive / ours at least {TARGET_SPEEDUP:.0f}x)",
        columns=COLUMNS,
    )
    with tempfile.TemporaryDirectory(prefix="dippy-bench-loras-") as tmp:
        for config in configs:
            result.rows.append(measure(config, Path(tmp), progress))
    result.notes.append(
        "ours = engine.loras.activate() on a cached LoRA; naive = load_lora_weights + "
        "unload_lora_weights (load, unload shown apart); medians per request"
    )
    result.notes.append("cold = our first activation of each LoRA (read, check, load), untimed pass")
    return result
