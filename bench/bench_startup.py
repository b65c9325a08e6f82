"""Orchestrator startup: seconds until `/health` answers, resident memory per replica, and whether
the model stack (torch, diffusers) got imported.

    .venv/bin/python bench/bench_startup.py                  # 1 and 3 workers, 5 starts each
    .venv/bin/python bench/bench_startup.py --compare-ref    # ... and the code of 36d0ce1, alternately
    .venv/bin/python bench/bench_startup.py --compare-ref REF --reps 3 --workers 1
    .venv/bin/python bench/run.py --only startup             # the same, from the runner

Each start runs `dippy-studio orchestrator serve --data-dir TMP --dev-key //bench/orchestrator
--port P --workers N` in a subprocess, as `bench_throughput.py` starts it: a fresh data directory
(SQLite), no chain, no miners, default settings otherwise. Per start:

- ready s: from starting the process until `GET /health` answers 200. With `--workers N` the
  first process serves only once every worker does (`orchestrator/serve.py`), so this is the
  time until all N replicas are up.
- RSS: resident memory of each of the server's processes (the first and its descendants, less
  multiprocessing's resource tracker): psutil, or VmRSS in /proc/PID/status. Taken when ready and
  again `SETTLE_S` later (background loops have started by then); the larger counts. The table
  shows the largest process.
- torch mapped: whether libtorch is mapped into any replica (/proc/PID/maps): imported by the
  process that serves, whatever imported it.

Once per code, apart from the timed starts: a Python process that builds the app with
`dippy_studio.orchestrator.app.create_app(OrchestratorSettings())` and reports whether `torch`
and `diffusers` are in `sys.modules` afterwards.

Goals on the 2-core development machine: at most 150 MB per replica and 3 s to ready. Starts of
old and new code alternate (A B, B A, ...); the table shows medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from common import CURRENT, BenchResult, Code, Column, NoProgress, Progress, code_at, describe, stop, tail

GOAL_READY_S = 3.0
GOAL_RSS_MB = 150.0
DEFAULT_REF = "36d0ce1"  # the orchestrator core before its rewrite
ORCHESTRATOR_URI = "//bench/orchestrator"
START_TIMEOUT_S = 120.0
POLL_S = 0.02
SETTLE_S = 2.0
MODEL_MODULES = ("torch", "diffusers")


@dataclass(frozen=True)
class Config:
    workers: int = 1
    reps: int = 5


FULL = (Config(workers=1), Config(workers=3))
QUICK = tuple(replace(config, reps=2) for config in FULL)

# Builds the app the way `serve` does (settings from DIPPY_ORCH_* variables) and says which of
# the model stack's modules that imported.
_IMPORTS_PROBE = """
import json, sys
from dippy_studio.orchestrator.app import create_app
from dippy_studio.orchestrator.settings import OrchestratorSettings
create_app(OrchestratorSettings())
print(json.dumps({name: name in sys.modules for name in sys.argv[1:]}))
"""


def columns(codes: list[Code]) -> list[Column]:
    shown = [Column("config", "config"), Column("reps", "starts")]
    for code in codes:
        label = "" if len(codes) == 1 else f"{code.name} "
        shown += [
            Column(f"{code.name}_ready_s", f"{label}ready s", "{:.2f}"),
            Column(f"{code.name}_rss_mb", f"{label}RSS MB/replica", "{:.0f}"),
            Column(f"{code.name}_processes", f"{label}processes"),
            Column(f"{code.name}_torch_mapped", f"{label}torch mapped"),
            Column(f"{code.name}_imports", f"{label}after create_app"),
        ]
    return [
        *shown,
        Column("ready_goal", f"ready <= {GOAL_READY_S:.0f} s"),
        Column("rss_goal", f"RSS <= {GOAL_RSS_MB:.0f} MB"),
        Column("load_average_1m", "load", "{:.1f}"),
    ]


# ---- one start ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(code: Code, workers: int) -> dict[str, Any]:
    """Start a server of `code` with `workers` replicas, measure it, stop it."""
    with tempfile.TemporaryDirectory(prefix="dippy-bench-startup-") as tmp:
        root = Path(tmp)
        port = free_port()
        log = root / "orchestrator.log"
        args = [sys.executable, "-m", "dippy_studio.cli", "orchestrator", "serve", "--data-dir", str(root / "data"),
                "--dev-key", ORCHESTRATOR_URI, "--port", str(port), "--workers", str(workers)]  # fmt: skip
        started = time.perf_counter()
        # cwd: not the checkout, whose directories could shadow `code` on sys.path.
        proc = subprocess.Popen(
            args, env=code.env(), cwd=root, stdin=subprocess.DEVNULL, stdout=log.open("w"), stderr=subprocess.STDOUT
        )
        try:
            ready_s = wait_healthy(proc, f"http://127.0.0.1:{port}/health", log) - started
            first = {pid: rss_bytes(pid) for pid in replicas(proc.pid)}
            time.sleep(SETTLE_S)
            pids = replicas(proc.pid)
            rss = {pid: max(rss_bytes(pid) or 0, first.get(pid) or 0) for pid in pids}
            mapped = any(torch_mapped(pid) for pid in pids)
        finally:
            stop(proc)
    return {
        "ready_s": ready_s,
        "rss_mb": [rss[pid] / 2**20 for pid in pids],
        "processes": len(pids),
        "torch_mapped": mapped,
    }


def wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> float:
    """The `time.perf_counter()` at which `url` first answered 200."""
    end = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(timeout=2) as http:
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"the orchestrator exited with {proc.returncode}:\n{tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if http.get(url).status_code == 200:
                    return time.perf_counter()
            time.sleep(POLL_S)
    raise RuntimeError(f"the orchestrator did not answer {url} in {START_TIMEOUT_S:.0f} s:\n{tail(log)}")


def replicas(pid: int) -> list[int]:
    """The server's processes: `pid` and its descendants, less multiprocessing's helpers."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{current}/cmdline").read_bytes()
            if b"resource_tracker" not in command and b"forkserver" not in command:
                found.append(current)
    return sorted(found)


def rss_bytes(pid: int) -> int | None:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return None
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def torch_mapped(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def model_imports(code: Code) -> str:
    """Which of the model stack's modules building the app imports, e.g. "torch, diffusers"."""
    with tempfile.TemporaryDirectory(prefix="dippy-bench-imports-") as tmp:
        env = code.env({"DIPPY_ORCH_DATA_DIR": str(Path(tmp) / "data"), "DIPPY_ORCH_DEV_KEY": ORCHESTRATOR_URI})
        done = subprocess.run(
            [sys.executable, "-c", _IMPORTS_PROBE, *MODEL_MODULES],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"probe failed: {why}"
    imported = [name for name, present in json.loads(lines[-1]).items() if present]
    return ", ".join(imported) or "none"


# ---- the benchmark --------------------------------------------------------------------------


def measure(
    config: Config, codes: list[Code], imports: dict[str, str], progress: Progress, echo: Callable[[str], None]
) -> dict[str, Any]:
    """`config.reps` starts of each code, alternating (A B, B A, ...): one table row."""
    name = f"{config.workers} worker{'s' * (config.workers > 1)}"
    starts: dict[str, list[dict[str, Any]]] = {code.name: [] for code in codes}
    task = progress.add_task(f"startup, {name}", total=config.reps * len(codes))
    for rep in range(config.reps):
        for code in codes if rep % 2 == 0 else codes[::-1]:
            measured = start(code, config.workers)
            starts[code.name].append(measured)
            rss = ", ".join(f"{mb:.0f}" for mb in measured["rss_mb"])
            echo(
                f"{name} start {rep + 1}/{config.reps} {code.name:>3}: ready in {measured['ready_s']:.2f} s, "
                f"RSS MB {rss}, torch {'mapped' if measured['torch_mapped'] else 'not mapped'}"
            )
            progress.advance(task)
    progress.remove_task(task)
    row: dict[str, Any] = {"config": f"SQLite, {name}", "workers": config.workers, "reps": config.reps}
    ready_met = rss_met = True
    for code in codes:
        runs = starts[code.name]
        ready = statistics.median(r["ready_s"] for r in runs)
        rss = statistics.median(max(r["rss_mb"]) for r in runs)
        row.update(
            {
                f"{code.name}_ready_s": ready,
                f"{code.name}_ready_min_s": min(r["ready_s"] for r in runs),
                f"{code.name}_rss_mb": rss,
                f"{code.name}_processes": max(r["processes"] for r in runs),
                f"{code.name}_torch_mapped": "yes" if any(r["torch_mapped"] for r in runs) else "no",
                f"{code.name}_imports": imports[code.name],
                f"{code.name}_starts": runs,
            }
        )
        if code.name == CURRENT.name:
            ready_met, rss_met = ready <= GOAL_READY_S, rss <= GOAL_RSS_MB
    row["ready_goal"] = "met" if ready_met else "missed"
    row["rss_goal"] = "met" if rss_met else "missed"
    row["identical"] = True  # nothing to compare byte for byte; a start that fails raises
    row["load_average_1m"] = os.getloadavg()[0]
    return row


def run(
    configs: tuple[Config, ...] = FULL, progress: Progress | None = None, compare_ref: str | None = None
) -> BenchResult:
    progress = progress or NoProgress()
    console = getattr(progress, "console", None)  # rich's Progress has one; print each start there

    def echo(line: str) -> None:
        if console is not None:
            console.print(line, markup=False, highlight=False)

    with contextlib.ExitStack() as stack:
        codes = [CURRENT]
        if compare_ref:
            codes.insert(0, stack.enter_context(code_at(compare_ref)))
        imports = {code.name: model_imports(code) for code in codes}
        result = BenchResult(
            name="startup",
            title=f"Orchestrator startup (goals: ready in at most {GOAL_READY_S:.0f} s, "
            f"at most {GOAL_RSS_MB:.0f} MB RSS per replica)",
            columns=columns(codes),
        )
        for config in configs:
            result.rows.append(measure(config, codes, imports, progress, echo))
    result.notes += [
        "ready: process start until GET /health answers 200 (with workers: until every replica serves); medians",
        f"RSS: the largest of the server's processes, when ready or {SETTLE_S:.0f} s later; "
        "torch mapped: libtorch in a replica's memory map",
        "after create_app: model modules in sys.modules once create_app(OrchestratorSettings()) returned",
    ]
    if compare_ref:
        result.notes.append(f"old: the code of {describe(compare_ref, codes[0])} (a git worktree), same venv")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, action="append", help="replicas per start (repeatable; default 1 and 3)")
    parser.add_argument("--reps", type=int, help="starts of each code per configuration (default 5, quick 2)")
    parser.add_argument("--quick", action="store_true", help="fewer starts")
    parser.add_argument(
        "--compare-ref",
        nargs="?",
        const=DEFAULT_REF,
        metavar="GIT_REF",
        help=f"also start the orchestrator of this git ref (default {DEFAULT_REF}), alternately",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser.parse_args(argv)


def configs_from(args: argparse.Namespace) -> tuple[Config, ...]:
    base = QUICK if args.quick else FULL
    if args.workers:
        base = tuple(replace(base[0], workers=workers) for workers in args.workers)
    if args.reps is not None:
        base = tuple(replace(config, reps=args.reps) for config in base)
    return base


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from run import table

    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console.width = 200  # logs and pipes: keep each table row on one line
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True)  # fmt: skip
    with progress:
        result = run(configs_from(args), progress, args.compare_ref)
    console.print(table(result))
    if args.json:
        report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "result": result.as_dict()}
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 1 if result.failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
