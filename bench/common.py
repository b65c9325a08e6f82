"""What the benchmarks share: interleaved timing, a result record, and a progress interface.

The machine is shared, so absolute times drift while a benchmark runs. Every benchmark
therefore measures its variants side by side, alternating which goes first, and reports
medians and their ratio: the ratio is the number to read.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
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


def stop(proc: subprocess.Popen) -> None:
    """Stop a server the benchmark started: SIGTERM, then SIGKILL if it has not exited in 20 s."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log, for an error message (empty when it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


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


# ---- code under test: this checkout, or an older commit beside it ---------------------------

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Code:
    """Which dippy_studio a benchmark's subprocesses run: this checkout's (`src` None, the
    installed package) or another commit's `src`, put first on PYTHONPATH. The venv's packages
    serve both, so an old commit must not need dependencies this checkout does not install."""

    name: str  # "new" or "old"
    src: Path | None = None
    commit: str | None = None  # of `src`, when it is another commit's

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {**os.environ, **(extra or {})}
        if self.src is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.src), os.environ.get("PYTHONPATH")) if p)
        return env


CURRENT = Code("new")


@contextlib.contextmanager
def code_at(ref: str) -> Iterator[Code]:
    """The code of a git ref, checked out with `git worktree add --detach` in a temporary
    directory for as long as the context lasts, then removed again (`git worktree remove`)."""
    commit = _git("rev-parse", "--short", f"{ref}^{{commit}}").strip()
    parent = Path(tempfile.mkdtemp(prefix="dippy-bench-ref-"))
    tree = parent / commit
    _git("worktree", "add", "--detach", str(tree), commit)
    try:
        code = Code("old", tree / "src", commit)
        _check_imports_from(code)
        yield code
    finally:
        # --force: the benchmark's runs may leave untracked files (caches) in the tree.
        with contextlib.suppress(subprocess.CalledProcessError):
            _git("worktree", "remove", "--force", str(tree))
        shutil.rmtree(parent, ignore_errors=True)


def describe(ref: str, code: Code) -> str:
    """A ref as given, with its commit when that says more: "main (36d0ce1)", "36d0ce1"."""
    return ref if code.commit is None or ref == code.commit else f"{ref} ({code.commit})"


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, ["git", *args], done.stdout, done.stderr)
    return done.stdout


def _check_imports_from(code: Code) -> None:
    """That a subprocess given `code.env()` really imports dippy_studio from `code.src`."""
    probe = [sys.executable, "-c", "import dippy_studio; print(dippy_studio.__file__)"]
    assert code.src is not None
    # Not from inside src/, where the working directory alone would make the import succeed.
    found = subprocess.run(probe, env=code.env(), cwd=code.src.parent, capture_output=True, text=True, check=True)
    if not Path(found.stdout.strip()).resolve().is_relative_to(code.src.resolve()):
        raise RuntimeError(f"{code.name}: dippy_studio comes from {found.stdout.strip()}, not {code.src}")
