"""What the benchmarks share: interleaved timing, a result record, and a progress interface.

The machine is shared, so absolute times drift while a benchmark runs. Every benchmark
therefore measures its variants side by side, alternating which goes first, and reports
medians and their ratio: the ratio is the number to read.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Progress(Protocol):
    """The part of `rich.progress.Progress` the benchmarks use."""

    def add_task(self, description: str, total: float | None = ...) -> Any: ...

    def advance(self, task_id: Any, advance: float = 1) -> None: ...

    def remove_task(self, task_id: Any) -> None: ...


class NoProgress:
    """A Progress that shows nothing (tests, JSON-only runs)."""

    def add_task(self, description: str, total: float | None = None) -> int:
        return 0

    def advance(self, task_id: Any, advance: float = 1) -> None:
        pass

    def remove_task(self, task_id: Any) -> None:
        pass


def timed(call: Callable[[], T]) -> tuple[float, T]:
    """Seconds taken by `call()` and what it returned."""
    started = perf_counter()
    value = call()
    return perf_counter() - started, value


def interleave(
    variants: dict[str, Callable[[], T]],
    reps: int,
    warmup: int,
    progress: Progress,
    description: str,
    on_round: Callable[[dict[str, T]], None] | None = None,
    budget_s: float | None = None,
) -> dict[str, list[float]]:
    """Run the variants in alternating order (A B, B A, ...) and return seconds per variant.

    Warmup rounds run the same way but are not timed. `on_round` sees each round's outputs
    (warmup included), so callers can check that the variants agree. Past `budget_s` seconds
    the timed rounds stop early (after at least MIN_REPS), so a busy machine cannot stretch
    a run without bound; callers read the number of rounds from the result.
    """
    names = list(variants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    task = progress.add_task(description, total=warmup + reps)
    started = perf_counter()
    for round_index in range(warmup + reps):
        if over_budget(started, budget_s, done=round_index - warmup, wanted=reps):
            break
        order = names if round_index % 2 == 0 else names[::-1]
        outputs: dict[str, T] = {}
        for name in order:
            elapsed, outputs[name] = timed(variants[name])
            if round_index >= warmup:
                seconds[name].append(elapsed)
        if on_round is not None:
            on_round(outputs)
        progress.advance(task)
    progress.remove_task(task)
    return seconds


MIN_REPS = 5


def over_budget(started: float, budget_s: float | None, done: int, wanted: int) -> bool:
    """Whether to stop timing: the budget is spent and enough repetitions are in."""
    if budget_s is None or done < min(MIN_REPS, wanted):
        return False
    return perf_counter() - started > budget_s


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of per-round ratios: robust to load that drifts over the run."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: str = "{}"


@dataclass
class BenchResult:
    """One benchmark's rows (one per configuration), how to show them, and whether checks held."""

    name: str
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        """Whether every configuration produced the same bytes in both variants."""
        return all(row["identical"] for row in self.rows)

    @property
    def failed_checks(self) -> list[str]:
        """Correctness checks that did not hold, as "config: check"."""
        failed = [f"{row['config']}: identical" for row in self.rows if not row["identical"]]
        for row in self.rows:
            failed += [f"{row['config']}: {name}" for name, ok in row.get("checks", {}).items() if not ok]
        return failed

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "rows": self.rows, "notes": self.notes}


def environment() -> dict[str, Any]:
    import diffusers
    import peft
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "load_average_1m": os.getloadavg()[0],
    }
