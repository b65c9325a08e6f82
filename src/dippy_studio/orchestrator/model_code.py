"""Model code, kept out of the orchestrator's process.

A replica is a front door: it never imports torch or diffusers. Two checks still need them, both
on a LoRA that arrives (a miner's trained one, a client's by URL): reading its tensors, and
fitting them to a profile's layers through diffusers' conversion of other trainers' formats.
They run in one child process per replica (`run`, a pebble `ProcessPool` of one worker), started
with the first LoRA and kept for the next, so only the first pays for loading torch (in the
child's initializer, outside any check's time limit). A check that kills the child (a crafted
file, say) or overruns its time limit (the child is then killed) raises `ModelCodeUnavailable`,
and the next check gets a new child.

The child is spawned, so, as with any spawned process, it imports the program's main module
again: a script that builds and serves the app itself must do so under
`if __name__ == "__main__":` (the `dippy-studio` commands do).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from dippy_studio.orchestrator.errors import Unavailable

if TYPE_CHECKING:
    from pebble import ProcessPool

log = logging.getLogger("dippy_studio.orchestrator.model_code")
_lock = threading.Lock()
_pool: ProcessPool | None = None


class ModelCodeUnavailable(Unavailable):
    """The child process gave no answer: it stopped, or ran past its time limit. Nothing was
    judged: whoever sent the LoRA is told to send it again later (HTTP 503)."""


def run(fn: Callable[..., str | None], args: tuple[Any, ...], timeout: float) -> str | None:
    """`fn(*args)` in the child process (a module-level function: it is sent by name), given at
    most `timeout` seconds once the child has started it."""
    from pebble import ProcessExpired

    future = _current().schedule(fn, args=args, timeout=timeout)
    try:
        return future.result()
    except FutureTimeout:
        why = f"the check took longer than {timeout:g} s and was stopped"
    except ProcessExpired:
        why = "the process checking it stopped while reading it"
    log.warning("%s gave no answer: %s", fn.__name__, why)
    raise ModelCodeUnavailable(f"the LoRA could not be checked: {why}")


def shutdown() -> None:
    """Stop the child, if one was started, and free what the pool holds. For the end of the
    process: a server that ends by re-raising its stop signal runs no finalizers, and the pool's
    semaphores would be left for multiprocessing's resource tracker to warn about."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.stop()
        pool.join()


def _current() -> ProcessPool:
    # Imported with the first LoRA, like the child itself: a replica that never sees one stays lean.
    from pebble import ProcessPool

    global _pool
    with _lock:
        if _pool is None:
            # Spawned, not forked: the replica runs threads (and maybe an event loop) that a
            # fork would copy half-way through.
            context = multiprocessing.get_context("spawn")
            _pool = ProcessPool(max_workers=1, initializer=_start_child, context=context)
        return _pool


def _start_child() -> None:
    # Ctrl-C reaches the whole process group; the replica stops its child itself, at exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Model code is loaded here, before the first check's clock starts.
    import dippy_studio.engine.lora
    import dippy_studio.engine.profiles  # noqa: F401
