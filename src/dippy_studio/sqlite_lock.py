"""One writer at a time per SQLite file, across threads and processes, without SQLite's busy polling.

SQLite's busy handler sleeps in growing steps (1, 2, 5, 10 ... up to 100 ms) however soon the
write lock frees, so writers that arrive together sleep past each other. Writers that queue
here first reach `BEGIN` (or their single statement) when the previous one has committed.
Used by the orchestrator's database (`orchestrator/db.py`) and the nonce store.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class WriteLock:
    """Writers to one SQLite file queue here: threads of this process on a `threading.Lock`,
    then processes on an advisory lock on a file beside the database (`fcntl.flock`).

    Waiting for the file lock polls in steps of 0.2 to 2 ms, so the next writer starts within a
    few milliseconds of the last commit, where SQLite's busy handler sleeps up to 100 ms. The wait
    is bounded like the busy timeout; past it the writer goes on to `BEGIN IMMEDIATE` and SQLite's
    own wait, so a stuck process cannot hang the others forever.
    """

    def __init__(self, path: Path | None) -> None:
        self._thread = threading.Lock()
        self._path = path
        self._fd: int | None = None
        self._pid = 0
        self._holds_file = False

    @classmethod
    def beside(cls, database: Path) -> WriteLock:
        """The lock for the SQLite file `database`: its lock file is `<database>-writelock`."""
        return cls(database.with_name(database.name + "-writelock"))

    def acquire(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if not self._thread.acquire(timeout=timeout):
            return False
        if self._path is not None:
            self._holds_file = self._lock_file(deadline)
        return True

    def release(self) -> None:
        if self._holds_file:
            self._holds_file = False
            fcntl.flock(self._file(), fcntl.LOCK_UN)
        self._thread.release()

    @contextmanager
    def held(self, timeout: float) -> Iterator[None]:
        """Hold the lock for a block; past `timeout` the block runs without it (SQLite's busy
        timeout then decides)."""
        acquired = self.acquire(timeout)
        try:
            yield
        finally:
            if acquired:
                self.release()

    def _file(self) -> int:
        # One descriptor per process: a lock taken through a descriptor inherited by fork would
        # be shared with the parent, and so exclude nothing.
        if self._fd is None or self._pid != os.getpid():
            assert self._path is not None
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd

    def _lock_file(self, deadline: float) -> bool:
        pause = 0.0002
        while True:
            try:
                fcntl.flock(self._file(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(pause)
                pause = min(pause * 2, 0.002)
