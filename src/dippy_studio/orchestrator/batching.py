"""A writer thread per database: every write transaction of the request path, in groups.

Writers to one database take turns (SQLite has one writer at a time; PostgreSQL rows are locked
per transaction), and a transaction costs about the same for one row as for fifty. So the store's
writes go to one thread, which takes everything that queued up while it was busy and writes it as
one transaction: under load the groups grow on their own; when idle, every write goes out at once,
alone. The event loop hands its work over without a thread of its own waiting (`submit`), other
threads block until their write has committed (`run`).

An operation is a function of no arguments that calls the store. Inside it, the store's writes
join the group's transaction (`connection`, opened at the first write), reads use their own
connections, and `prepare` (statements that must not hold the group's locks) runs before the
transaction, outside it. A prepare may instead be a `Gathered` item: work that the group then does
once for all its operations (one read of an API key, one count of a key's requests), outside the
transaction, before it.

`writers` above one runs several such threads, each writing groups of its own (for one process on
PostgreSQL). Why a writer thread rather than the waiting threads taking turns at writing: every
hand-over between threads costs Python a GIL switch and the kernel a wake-up, and under load those
were most of the orchestrator's time (bench/bench_throughput.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection

log = logging.getLogger("dippy_studio.orchestrator.batching")

T = TypeVar("T")
Item = TypeVar("Item")
R = TypeVar("R")


class Gathered(Generic[Item, R]):
    """One operation's share of work done once per group: the group calls `flush` with the items
    of all its operations that gathered under the same `key`, in arrival order, and each gets back
    its own `result`. A flush's writes are committed on their own, before the group's transaction;
    a flush that raises is rolled back and fails every operation that gathered into it."""

    __slots__ = ("flush", "item", "key", "result")

    def __init__(self, key: object, item: Item, flush: Callable[[list[Item]], list[R]]) -> None:
        self.key = key
        self.item = item
        self.flush = flush
        self.result: R | None = None


class _Op(Generic[T]):
    __slots__ = ("done", "error", "fn", "future", "lock_key", "loop", "prepare", "value")

    def __init__(
        self,
        fn: Callable[[], T],
        lock_key: str,
        prepare: Callable[[], object] | Gathered[Any, Any] | None,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.fn = fn
        self.lock_key = lock_key
        self.prepare = prepare
        self.loop = loop
        # Threads wait on `done`; an event loop gets `future`, resolved on the loop's own thread.
        self.done: threading.Event | None = None if loop else threading.Event()
        self.future: asyncio.Future[T] | None = loop.create_future() if loop else None
        self.value: T | None = None
        self.error: BaseException | None = None


class GroupCommit:
    """Runs operations on a writer thread, each group of them in one transaction.

    With `writers` above one, that many threads each take the next group while the others write
    theirs (PostgreSQL: while one waits on the server, another prepares; SQLite has one writer
    at a time, so one thread).

    `run(fn)` (from any thread) and `submit(fn)` (from an event loop, awaitable) run `fn()` on the
    writer thread and give its result once the transaction it wrote in has committed. A group's
    operations that name a `lock_key` (the row they may wait to lock, a job id) run first, in key
    order, and the rest (inserts, SKIP LOCKED claims: they lock rows but never wait for one) after
    them. So a group waits only while holding rows of smaller keys, and two replicas' groups cannot
    deadlock each other.

    If a group fails, it is rolled back and each of its operations runs again alone, so one
    operation's error (a constraint, a deadlock between replicas) reaches only its own caller.
    Operations must therefore be safe to run twice after a rollback, as a transaction is, and
    should return expected refusals as values rather than raise them. An operation must not wait
    for another operation; a nested `run` on the writer thread joins the transaction in progress.
    """

    def __init__(
        self, begin: Callable[[], AbstractContextManager[Connection]], *, writers: int = 1, max_group: int = 256
    ) -> None:
        self._begin = begin
        self.max_group = max_group
        self.writers = writers
        self._cond = threading.Condition()
        self._queue: deque[_Op[Any]] = deque()
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self._local = threading.local()  # a writer's current transaction and connection
        self.groups = 0  # transactions committed, for tests and benchmarks
        self.ops = 0

    # ---- callers --------------------------------------------------------------------------------

    def run(self, fn: Callable[[Connection], T], lock_key: str = "") -> T:
        """`fn(connection)` in a group's write transaction; returns once that has committed."""
        if self.on_writer_thread():
            return fn(self.connection())
        op: _Op[T] = _Op(lambda: fn(self.connection()), lock_key, None, None)
        self._put(op)
        assert op.done is not None
        op.done.wait()
        if op.error is not None:
            raise op.error
        return op.value  # type: ignore[return-value]

    def submit(
        self, fn: Callable[[], T], lock_key: str = "", prepare: Callable[[], object] | Gathered[Any, Any] | None = None
    ) -> asyncio.Future[T]:
        """Run `fn()` on the writer thread, `prepare()` (or the group's flush of a `Gathered`) first,
        outside the transaction: its error fails the operation without running `fn`. Call on an
        event loop; await the result."""
        op: _Op[T] = _Op(fn, lock_key, prepare, asyncio.get_running_loop())
        self._put(op)
        assert op.future is not None
        return op.future

    def on_writer_thread(self) -> bool:
        return getattr(self._local, "writer", False)

    def connection(self) -> Connection:
        """The current group's connection, its transaction begun at the first call (writer threads only)."""
        if not self.on_writer_thread():
            raise RuntimeError("GroupCommit.connection() is for operations on the writer thread")
        local = self._local
        if local.connection is None:
            local.transaction = self._begin()
            local.connection = local.transaction.__enter__()
        return local.connection

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the threads. A later operation starts new ones."""
        with self._cond:
            threads, self._closed = set(self._threads), True
            self._cond.notify_all()
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def _put(self, op: _Op[Any]) -> None:
        with self._cond:
            self._queue.append(op)
            # Closing threads still write everything queued before they stop, this op included.
            if not self._threads:
                self._closed = False
                for k in range(self.writers):
                    thread = threading.Thread(target=self._loop, name=f"orch-db-writer-{k}", daemon=True)
                    self._threads.add(thread)
                    thread.start()
            self._cond.notify()

    # ---- the writer thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        self._local.writer, self._local.transaction, self._local.connection = True, None, None
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    self._threads.discard(threading.current_thread())
                    return
                group = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_group))]
            try:
                self._write(group)
            except Exception as exc:
                # A bug in writing itself, not in an operation: fail this group, keep the thread.
                log.exception("writing a group of %d failed", len(group))
                for op in group:
                    if op.error is None and op.value is None:
                        op.error = exc
            finally:
                self._settle(group)

    def _write(self, group: list[_Op[Any]]) -> None:
        gathered: dict[object, list[_Op[Any]]] = {}
        for op in group:
            if isinstance(op.prepare, Gathered):
                gathered.setdefault(op.prepare.key, []).append(op)
            elif op.prepare is not None:
                try:
                    op.prepare()
                except BaseException as exc:
                    op.error = exc
        for ops in gathered.values():
            items: list[Gathered[Any, Any]] = [op.prepare for op in ops]  # type: ignore[misc]
            try:
                results = items[0].flush([item.item for item in items])
                # Committed now, on its own: its results must hold even if the group's transaction
                # fails (and its operations run again alone, without the flush).
                self._end(None)
                for item, result in zip(items, results, strict=True):
                    item.result = result
            except BaseException as exc:
                self._end(exc)
                for op in ops:
                    op.error = exc
        ready = [op for op in group if op.error is None]
        if not ready:
            return
        ready.sort(key=lambda op: (not op.lock_key, op.lock_key))
        try:
            self._transaction_of(ready)
        except BaseException as exc:
            if len(ready) == 1:
                ready[0].error = exc
                return
            for op in ready:
                try:
                    self._transaction_of([op])
                except BaseException as alone:
                    op.error = alone

    def _transaction_of(self, ops: list[_Op[Any]]) -> None:
        try:
            values = [op.fn() for op in ops]
        except BaseException as exc:
            self._end(exc)
            raise
        self._end(None)
        # Committed: only now may callers act on what they wrote.
        for op, value in zip(ops, values, strict=True):
            op.value = value
        self.groups += 1
        self.ops += len(ops)

    def _end(self, error: BaseException | None) -> None:
        local = self._local
        transaction, local.transaction, local.connection = local.transaction, None, None
        if transaction is None:
            return
        if error is None:
            transaction.__exit__(None, None, None)  # commits; raises if the commit fails
        else:
            transaction.__exit__(type(error), error, error.__traceback__)

    def _settle(self, group: list[_Op[Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Op[Any]]] = {}
        for op in group:
            if op.done is not None:
                op.done.set()
            else:
                assert op.loop is not None
                by_loop.setdefault(op.loop, []).append(op)
        for loop, ops in by_loop.items():
            # One wake-up of the loop for the whole group, not one per operation.
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(_resolve, ops)


def _resolve(ops: list[_Op[Any]]) -> None:
    for op in ops:
        future = op.future
        assert future is not None
        if future.done():  # canceled by its caller
            continue
        if op.error is not None:
            future.set_exception(op.error)
        else:
            future.set_result(op.value)
