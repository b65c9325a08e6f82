"""Measure the held-out loss improvement of honest and dishonest LoRAs, as a training audit sees it.

A training audit (orchestrator/audit.py) passes a LoRA when it lowers the flow-matching loss on
held-out images by `Thresholds.min_improvement`; the improvement also sets the job's quality
factor (orchestrator/scoring.py, `FULL_CREDIT_IMPROVEMENT`). This script splits synthetic
datasets the way the orchestrator does (`engine.datasets.split_dataset`: 20% held out), trains
on the training part, and evaluates on the held-out part:

- honest LoRAs, trained for several step counts;
- an untrained LoRA (no step taken: lora_B = 0), the demo miner's cheat;
- random weights of the promised shape;
- a LoRA trained honestly on another style (a replayed LoRA from another client's job).

    .venv/bin/python bench/measure_training_audit.py            # about a minute on a busy 2-core machine
    .venv/bin/python bench/measure_training_audit.py --steps 12,30 --seeds 1
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from dippy_studio.engine import Engine, EngineOptions
from dippy_studio.engine.datasets import load_dataset, split_dataset
from dippy_studio.engine.evaluation import evaluate_lora
from dippy_studio.engine.synthetic_data import STYLES, write_dataset
from dippy_studio.engine.training import DEFAULT_TARGETS, TrainConfig, train_lora
from dippy_studio.orchestrator.audit import DEFAULT_THRESHOLDS

TRIGGER = "sks"
IMAGES = 10
# The replayed LoRA's step count: the demo's, a well-trained tiny LoRA.
REPLAY_STEPS = 60


def random_lora(path: Path, rank: int = 4) -> Path:
    transformer = Engine(EngineOptions(profile="tiny", threads=1)).pipe.transformer
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(f".{t}") for t in DEFAULT_TARGETS):
            tensors[f"transformer.{name}.lora_A.weight"] = (
                torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            )
            tensors[f"transformer.{name}.lora_B.weight"] = (
                torch.randn(module.out_features, rank, generator=generator) * 0.5
            )
    save_file(tensors, str(path))
    return path


def measure(steps: Sequence[int], seeds: int, root: Path) -> dict[str, list[float]]:
    options = EngineOptions(profile="tiny", threads=1)

    def improvement(lora: Path, heldout) -> float:
        return evaluate_lora(options, lora, heldout, trigger=TRIGGER, guidance=1.0).improvement

    def trained(dataset, name: str, count: int, budget: float | None = None) -> Path:
        config = TrainConfig(steps=count, trigger=TRIGGER)
        return train_lora(dataset, root / f"{name}.safetensors", config, options=options, max_seconds=budget).path

    results: dict[str, list[float]] = defaultdict(list)
    random_weights = random_lora(root / "random.safetensors")
    styles = list(STYLES)
    for style in styles:
        for seed in range(seeds):
            dataset = load_dataset(write_dataset(root / f"{style}-{seed}", style, count=IMAGES, seed=seed, size=32))
            split = split_dataset(dataset, 0.2, 5)
            assert split is not None
            for count in steps:
                results[f"honest, {count} steps"].append(
                    improvement(trained(split.train, "honest", count), split.heldout)
                )
            results["untrained (no step)"].append(
                improvement(trained(split.train, "untrained", 1, 1e-9), split.heldout)
            )
            results["random weights"].append(improvement(random_weights, split.heldout))
            other = styles[(styles.index(style) + 1) % len(styles)]
            other_data = load_dataset(
                write_dataset(root / f"{other}-{seed}-x", other, count=8, seed=seed + 100, size=32)
            )
            replayed = trained(other_data, "replayed", REPLAY_STEPS)
            results[f"trained on another style ({REPLAY_STEPS} steps)"].append(improvement(replayed, split.heldout))
    return results


def report(results: dict[str, list[float]], console: Console) -> None:
    threshold = DEFAULT_THRESHOLDS.min_improvement
    table = Table(title=f"held-out loss improvement (tiny, {IMAGES} images, 2 held out; pass at >= {threshold:.0%})")
    for column in ("LoRA", "improvement min..max", "mean", "passes"):
        table.add_column(column)
    for name, values in results.items():
        passes = sum(v >= threshold for v in values)
        table.add_row(
            name,
            f"{min(values):+.3f} .. {max(values):+.3f}",
            f"{sum(values) / len(values):+.3f}",
            f"{passes}/{len(values)}",
        )
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="12,30,60,200", help="honest step counts, comma-separated")
    parser.add_argument("--seeds", type=int, default=2, help="datasets per style")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dippy-training-audit-") as tmp:
        results = measure([int(s) for s in args.steps.split(",")], args.seeds, Path(tmp))
    report(results, Console())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
