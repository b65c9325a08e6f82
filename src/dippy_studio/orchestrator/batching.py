"""Coalescing small writes from many threads into one transaction.

Writers to one database take turns (SQLite has one writer at a time; PostgreSQL rows are locked
per transaction), and a transaction costs about the same for one row as for fifty. So where many
threads each have a small write that nobody waits on, the first of them writes for everyone:
it takes what has queued up, writes it as one batch, and repeats until nothing is left, while
the others only add to the queue and go on. Under load the batches grow on their own; when
idle, every write goes out at once, alone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger("dippy_studio.orchestrator.batching")

T = TypeVar("T")


class Coalescer(Generic[T]):
    def __init__(self, name: str, write: Callable[[list[T]], object]) -> None:
        self.name = name
        self._write = write
        self._lock = threading.Lock()
        self._pending: list[T] = []
        self._writing = False

    def add(self, item: T) -> None:
        """Queue `item`; write it (and whatever else is queued) unless another thread is writing."""
        with self._lock:
            self._pending.append(item)
        # A writer busy now sees the item: it only stops once it finds the queue empty.
        self.flush()

    def flush(self) -> None:
        """Write whatever is queued now (shutdown, tests)."""
        with self._lock:
            if self._writing:
                return
            self._writing = True
        self._drain()

    def _drain(self) -> None:
        while True:
            with self._lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._writing = False
                    return
            try:
                self._write(batch)
            except Exception:
                # Best effort by design: callers do not wait on these writes.
                log.exception("%s: writing a batch of %d failed", self.name, len(batch))
