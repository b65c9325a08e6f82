"""Run the benchmarks and print a table per benchmark; optionally write the results as JSON.

    .venv/bin/python bench/run.py                    # everything, about 2 minutes on 2 cores
    .venv/bin/python bench/run.py --quick            # fewer repetitions, for a smoke check
    .venv/bin/python bench/run.py --only overhead    # one benchmark
    .venv/bin/python bench/run.py --json             # also write bench/out/bench-<time>.json

Exits 1 when a variant produced different bytes (a correctness failure); a missed speed
target is reported but does not fail the run, since shared machines make timings noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
from pathlib import Path

# Keep stray BLAS/OpenMP pools from oversubscribing the cores the engine pins (2 threads).
os.environ.setdefault("OMP_NUM_THREADS", "2")

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common import BenchResult, environment

OUT_DIR = Path(__file__).resolve().parent / "out"

# name -> module under bench/. A module provides FULL and QUICK (tuples of its configs) and
# run(configs, progress) -> BenchResult. Imported only when run, so one benchmark's heavy or
# broken imports do not stop the others.
BENCHMARKS: dict[str, str] = {
    "overhead": "bench_overhead",
    "lora_switch": "bench_lora_switch",
    "throughput": "bench_throughput",
    "training": "bench_training",
    "miner": "bench_miner",
    "startup": "bench_startup",
    "edit": "bench_edit",
}


def run_benchmark(name: str, quick: bool, threads: int | None, progress: Progress) -> BenchResult:
    module = importlib.import_module(BENCHMARKS[name])
    configs = module.QUICK if quick else module.FULL
    if threads is not None:
        try:
            configs = tuple(dataclasses.replace(config, threads=threads) for config in configs)
        except TypeError:
            raise SystemExit(f"benchmark {name!r} has no thread setting; run it without --threads") from None
    return module.run(configs, progress)


def table(result: BenchResult) -> Table:
    shown = Table(title=result.title, title_justify="left", caption="\n".join(result.notes))
    for column in result.columns:
        if column.key == "config":
            shown.add_column(column.header, no_wrap=True)
        else:
            shown.add_column(column.header, justify="right")
    for row in result.rows:
        cells = []
        for column in result.columns:
            value = row[column.key]
            if isinstance(value, bool):
                cells.append("[green]yes[/]" if value else "[red]NO[/]")
            elif value == "missed":
                cells.append("[yellow]missed[/]")
            else:
                cells.append(column.fmt.format(value))
        shown.add_row(*cells)
    return shown


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (well under a minute)")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="run only NAME (repeatable)")
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="engine threads instead of the profiles' 2; 1 gives steadier ratios on a busy machine",
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const=True,
        metavar="PATH",
        help="write results as JSON to PATH (default: bench/out/bench-<time>.json)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console.width = 160  # logs and pipes: keep each table row on one line
    names = args.only or list(BENCHMARKS)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    results: list[BenchResult] = []
    started = time.perf_counter()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    for name in names:
        with progress:
            result = run_benchmark(name, args.quick, args.threads, progress)
        results.append(result)
        console.print(table(result))
        console.print()
    elapsed = time.perf_counter() - started

    failed = [check for result in results for check in result.failed_checks]
    for check in failed:
        console.print(f"[red]check failed[/] {check}")
    console.print(f"done in {elapsed:.0f} s")

    if args.json:
        path = Path(args.json) if isinstance(args.json, str) else OUT_DIR / time.strftime("bench-%Y%m%d-%H%M%S.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "command": command,
            "quick": args.quick,
            "threads": args.threads,
            "seconds": elapsed,
            "environment": environment(),
            "benchmarks": [result.as_dict() for result in results],
        }
        path.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"results written to {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
