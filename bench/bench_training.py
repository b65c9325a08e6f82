"""LoRA training speed: our trainer against a plain diffusers + peft loop, and what caching saves.

    .venv/bin/python bench/bench_training.py            # about 90 s on 2 idle cores
    .venv/bin/python bench/bench_training.py --quick    # about 15 s
    .venv/bin/python bench/bench_training.py --json out.json

Both trainers get the same model (a freshly loaded profile pipeline), the same images and
captions, the same batch size, resolution, rank, alpha, targets and learning rate. Per round
each runs a fixed number of optimizer steps; only the step loop is timed (model loading and
the one-off encoding are reported apart). The variants alternate in every round, so a busy
neighbour slows them alike; read the ratios.

- ours / reference: `train_lora` (latents and text embeddings cached) against
  `reference_train.reference_train` with the same caching. Target: 1.0x or better.
- uncached: both with the VAE and text encoders run on every batch.
- caching: our cached steps/s over our uncached steps/s, and the one-off encoding cost.

Checks: our cached and uncached runs write byte-identical LoRA files (caching changes speed,
never the result), and every loss is finite. The learning rate is the profile's default.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

os.environ.setdefault("OMP_NUM_THREADS", "2")

from common import BenchResult, Column, NoProgress, Progress, environment, paired_ratio
from dippy_studio.engine.datasets import Dataset, load_dataset
from dippy_studio.engine.profiles import EngineOptions, get_profile, load_pipeline
from dippy_studio.engine.synthetic_data import write_dataset
from dippy_studio.engine.training import TrainConfig, pixel_tensor, train_lora
from reference_train import reference_train

TARGET_RATIO = 1.0
WARMUP_STEPS = 3  # first steps of every run (allocator, autograd warm-up) are not timed
TRIGGER = "sks"


@dataclass(frozen=True)
class Config:
    profile: str
    resolution: int
    batch_size: int
    steps: int  # optimizer steps per timed run
    rounds: int
    images: int = 8

    @property
    def name(self) -> str:
        return f"{self.profile} {self.resolution}px batch {self.batch_size}"


FULL = (
    Config("tiny", 32, 4, steps=60, rounds=3),
    Config("tiny", 64, 4, steps=30, rounds=3),
    Config("small", 128, 2, steps=20, rounds=3),
)
QUICK = (
    Config("tiny", 32, 4, steps=20, rounds=1),
    Config("small", 128, 2, steps=10, rounds=1),
)

COLUMNS = [
    Column("config", "config"),
    Column("ours_sps", "ours steps/s", "{:.1f}"),
    Column("ref_sps", "reference steps/s", "{:.1f}"),
    Column("ratio", "ratio", "{:.2f}x"),
    Column("paired_ratio", "paired ratio", "{:.2f}x"),
    Column("target", "target"),
    Column("ours_uncached_sps", "ours uncached", "{:.1f}"),
    Column("ref_uncached_sps", "ref uncached", "{:.1f}"),
    Column("uncached_ratio", "uncached ratio", "{:.2f}x"),
    Column("caching_speedup", "caching speedup (ours)", "{:.2f}x"),
    Column("ref_caching_speedup", "caching speedup (ref)", "{:.2f}x"),
    Column("cache_ms", "one-off encoding ms", "{:.0f}"),
    Column("rounds", "rounds"),
    Column("identical", "cached = uncached"),
]


def run(configs: tuple[Config, ...] = FULL, progress: Progress | None = None) -> BenchResult:
    progress = progress or NoProgress()
    result = BenchResult(
        name="training",
        title="LoRA training: our trainer vs a plain diffusers + peft loop (steps per second, higher is better)",
        columns=COLUMNS,
        notes=[
            f"target: ours/reference >= {TARGET_RATIO:.1f}x with latents and text cached; rank 4 on to_q/k/v/out, "
            "the profile's default learning rate",
            "steps/s: 1 / median step time over the timed steps of all rounds (each run's first steps are warm-up)",
            "ratio: of those; paired ratio: median over rounds of the ratio of that round's median step times",
        ],
    )
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        for config in configs:
            result.rows.append(_run_config(config, Path(tmp), progress))
    return result


def _run_config(config: Config, tmp: Path, progress: Progress) -> dict:
    dataset = load_dataset(
        write_dataset(tmp / f"data-{config.resolution}", "sunset", count=config.images, size=config.resolution)
    )
    train_config = TrainConfig(
        profile=config.profile,
        trigger=TRIGGER,
        rank=4,
        alpha=4.0,
        steps=config.steps,
        batch_size=config.batch_size,
        resolution=config.resolution,
    )
    variants = ["ours", "ref", "ours_uncached", "ref_uncached"]
    # Per variant: every timed step's duration (all rounds), and each round's median step.
    steps_s: dict[str, list[float]] = {name: [] for name in variants}
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, list[float]] = {}
    cache_seconds: list[float] = []
    files: dict[str, bytes] = {}
    task = progress.add_task(f"training {config.name}", total=config.rounds * len(variants))
    for round_index in range(config.rounds):
        order = variants if round_index % 2 == 0 else variants[::-1]
        for variant in order:
            cached = not variant.endswith("_uncached")
            if variant.startswith("ours"):
                out = tmp / f"{variant}.safetensors"
                stamps: list[float] = []
                trained = train_lora(
                    dataset,
                    out,
                    train_config,
                    cache=cached,
                    on_progress=lambda _, stamp=stamps.append: stamp(perf_counter()),
                )
                durations = [b - a for a, b in itertools.pairwise(stamps)]
                losses[variant] = list(trained.losses)
                files[variant] = out.read_bytes()
                if cached:
                    cache_seconds.append(trained.cache_seconds)
            else:
                reference = _reference(config, train_config, dataset, cached)
                durations = reference.step_seconds[1:]
                losses[variant] = reference.losses
            timed = durations[WARMUP_STEPS:] or durations  # very short runs (smoke tests) keep them all
            steps_s[variant] += timed
            rounds[variant].append(statistics.median(timed))
            progress.advance(task)
    progress.remove_task(task)

    def sps(name: str) -> float:
        return 1.0 / statistics.median(steps_s[name])

    ratio = sps("ours") / sps("ref")
    return {
        "config": config.name,
        "ours_sps": sps("ours"),
        "ref_sps": sps("ref"),
        "ratio": ratio,
        "paired_ratio": paired_ratio(rounds["ref"], rounds["ours"]),
        "target": "met" if ratio >= TARGET_RATIO else "missed",
        "ours_uncached_sps": sps("ours_uncached"),
        "ref_uncached_sps": sps("ref_uncached"),
        "uncached_ratio": sps("ours_uncached") / sps("ref_uncached"),
        "caching_speedup": sps("ours") / sps("ours_uncached"),
        "ref_caching_speedup": sps("ref") / sps("ref_uncached"),
        "cache_ms": statistics.median(cache_seconds) * 1e3,
        "rounds": config.rounds,
        "identical": files["ours"] == files["ours_uncached"],
        "checks": {f"{name}_losses_finite": all(map(math.isfinite, values)) for name, values in sorted(losses.items())},
        "final_loss": {name: statistics.mean(values[-5:]) for name, values in sorted(losses.items())},
        "round_median_step_seconds": rounds,
    }


def _reference(config: Config, train_config: TrainConfig, dataset: Dataset, cache: bool):
    options = EngineOptions(profile=config.profile)
    pipe = load_pipeline(options)  # fresh, like ours: no adapters left over from another round
    return reference_train(
        pipe,
        pixel_tensor(dataset, config.resolution),
        dataset.captions(TRIGGER),
        steps=config.steps,
        batch_size=config.batch_size,
        rank=train_config.rank,
        alpha=train_config.alpha,
        lr=train_config.lr,
        seed=train_config.seed,
        targets=train_config.targets,
        max_sequence_length=get_profile(config.profile).max_sequence_length,
        cache=cache,
    )


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    from run import table  # bench/run.py renders every benchmark's table the same way

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console.width = 200
    progress = RichProgress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    with progress:
        result = run(QUICK if args.quick else FULL, progress)
    console.print(table(result))
    for check in result.failed_checks:
        console.print(f"[red]check failed[/] {check}")
    if args.json:
        report = {"command": " ".join(sys.argv), "environment": environment(), "benchmarks": [result.as_dict()]}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if result.failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
