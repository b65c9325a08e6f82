"""Model code, kept out of the orchestrator's process.

A replica is a front door: it never imports torch or diffusers. Two checks still need them, both
on a LoRA that arrives (a miner's trained one, a client's by URL): reading its tensors, and
fitting them to a profile's layers through diffusers' conversion of other trainers' formats.
They run in one child process per replica (`run`), started with the first LoRA and kept for the
next, so only the first pays for loading torch. A LoRA that kills the child (a crafted file, say)
gets a refusal, and the next call starts a new child.

The child is spawned, so, as with any spawned process, it imports the program's main module
again: a script that builds and serves the app itself must do so under
`if __name__ == "__main__":` (the `dippy-studio` commands do).
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import ParamSpec

P = ParamSpec("P")

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None


class ModelCodeDied(RuntimeError):
    """The child process running model code stopped before it answered."""


def run(fn: Callable[P, str | None], *args: P.args, **kwargs: P.kwargs) -> str | None:
    """`fn(*args, **kwargs)` in the child process (a module-level function: it is sent by
    name). `ModelCodeDied` when the child stopped twice in a row."""
    for _ in range(2):
        pool = _current()
        try:
            return pool.submit(fn, *args, **kwargs).result()
        except BrokenProcessPool:
            _forget(pool)
    raise ModelCodeDied("the process checking it stopped while reading it")


def _current() -> ProcessPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            # Spawned, not forked: the replica runs threads (and maybe an event loop) that a
            # fork would copy half-way through.
            context = multiprocessing.get_context("spawn")
            _pool = ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_ignore_interrupts)
        return _pool


def _forget(pool: ProcessPoolExecutor) -> None:
    global _pool
    with _lock:
        if _pool is pool:
            _pool = None
    pool.shutdown(wait=False)


def _ignore_interrupts() -> None:
    # Ctrl-C reaches the whole process group; the replica stops its child itself, at exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
