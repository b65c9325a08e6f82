"""Coalescing small writes from many threads into one transaction.

`GroupCommit` runs the store's write transactions: operations that arrive while one commits
share the next. `Coalescer` goes further for writes nobody waits on, merging their items into
one statement.

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
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection

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


class _Op(Generic[T]):
    __slots__ = ("done", "error", "fn", "lead", "lock_key", "settled", "value")

    def __init__(self, fn: Callable[[Connection], T], lock_key: str) -> None:
        self.fn = fn
        self.lock_key = lock_key
        self.done = threading.Event()
        self.lead = False  # set with `done` when this op's thread is to write the next batch
        self.value: T | None = None
        self.error: BaseException | None = None
        self.settled = False  # value or error is final


class GroupCommit:
    """Write transactions from many threads, committed together.

    `run(fn)` runs `fn(connection)` inside a write transaction and returns what it returns, once
    that transaction has committed. Operations that arrive while a transaction is being written
    wait and go into the next one, all together: one BEGIN and one COMMIT (on SQLite one turn of
    the write lock and one WAL append; on PostgreSQL one WAL flush) for the whole group. The
    thread whose operation comes first writes the group; when it is done it hands the next group
    to the thread of the first operation waiting, so no request thread writes for others for long.

    If a group fails, it is rolled back and each of its operations runs again alone, so one
    operation's error (a constraint, a deadlock between replicas) reaches only its own caller.
    Operations must therefore be safe to run twice after a rollback, as a transaction is.
    An operation must not call `run` from another thread and wait for it; a nested `run` on the
    writing thread joins the transaction in progress.
    """

    def __init__(self, begin: Callable[[], AbstractContextManager[Connection]], max_group: int = 128) -> None:
        self._begin = begin
        self.max_group = max_group
        self._lock = threading.Lock()
        self._queue: deque[_Op[Any]] = deque()
        self._writing = False
        self._local = threading.local()
        self.groups = 0  # transactions written, for tests and benchmarks
        self.ops = 0

    def run(self, fn: Callable[[Connection], T], lock_key: str = "") -> T:
        """`lock_key` names the row `fn` may wait to lock (a job id). A group runs those operations
        first, in key order, and the rest (inserts, SKIP LOCKED claims: they lock rows but never
        wait for one) after them. So a group waits only while holding rows of smaller keys, and
        two replicas' groups cannot deadlock each other."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return fn(conn)
        op: _Op[T] = _Op(fn, lock_key)
        with self._lock:
            self._queue.append(op)
            lead = not self._writing
            self._writing = True
        if not lead:
            op.done.wait()
        if lead or op.lead:
            self._write_next_group(op)
        if op.error is not None:
            raise op.error
        return op.value  # type: ignore[return-value]

    def _write_next_group(self, own: _Op[Any]) -> None:
        """Write the next group, which starts with this thread's own op (it is first in the
        queue), then hand the rest to the first op still waiting, or stop when none is."""
        with self._lock:
            group = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_group))]
        assert group[0] is own
        self._write(group)
        with self._lock:
            if not self._queue:
                self._writing = False
                return
            successor = self._queue[0]
        successor.lead = True
        successor.done.set()

    def _write(self, group: list[_Op[Any]]) -> None:
        try:
            try:
                self._transaction(group)
            except Exception:
                if len(group) == 1:
                    raise
                for op in group:
                    self._alone(op)
        except BaseException as exc:
            for op in group:
                if not op.settled:
                    op.error, op.settled = exc, True
        finally:
            for op in group:
                op.done.set()

    def _transaction(self, group: list[_Op[Any]]) -> None:
        group.sort(key=lambda op: (not op.lock_key, op.lock_key))
        with self._begin() as conn:
            self._local.conn = conn
            try:
                values = [op.fn(conn) for op in group]
            finally:
                self._local.conn = None
        # Committed: only now may callers act on what they wrote.
        for op, value in zip(group, values, strict=True):
            op.value, op.settled = value, True
        self.groups += 1
        self.ops += len(group)

    def _alone(self, op: _Op[Any]) -> None:
        try:
            self._transaction([op])
        except Exception as exc:
            op.error, op.settled = exc, True
