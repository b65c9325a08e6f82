"""The store's writer thread: every write transaction of the orchestrator, committed in groups.

Writers to one database take turns (SQLite has one writer at a time; PostgreSQL rows are locked
per transaction), and a transaction costs about the same for one row as for fifty. So every
write goes to one thread, which takes everything that queued up while it was busy and commits it
as one transaction: under load the groups grow on their own; when idle, every write goes out at
once, alone. Other threads block until their write has committed (`run`); an event loop awaits
it without a thread of its own waiting (`submit`). A writer thread rather than waiting threads
taking turns at writing: every hand-over between threads costs Python a GIL switch and the kernel
a wake-up, and under load those were most of the orchestrator's time (bench/bench_throughput.py).

A call is one store method (`Store.call`), which writes once (`run`): a second write in one call
is a bug this module refuses, so one call is always one unit of work. A group's calls that name a
`lock_key` (the row they may wait to lock, a job id) run first, in key order, and the rest
(inserts, SKIP LOCKED claims: they lock rows but never wait for one) after them, so a group waits
only while holding rows of smaller keys and two replicas' groups cannot deadlock each other. If a
group fails, it is rolled back and each of its calls runs again alone, so one call's error (a
constraint, a deadlock between replicas, a bad request) reaches only its own caller; a call must
therefore be safe to run twice after a rollback, as a transaction is.
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

log = logging.getLogger("dippy_studio.orchestrator.writer")

T = TypeVar("T")
# The most calls one transaction takes.
MAX_GROUP = 256


class _Call(Generic[T]):
    __slots__ = ("done", "error", "fn", "future", "lock_key", "loop", "value")

    def __init__(self, fn: Callable[[], T], lock_key: str, loop: asyncio.AbstractEventLoop | None) -> None:
        self.fn = fn
        self.lock_key = lock_key
        self.loop = loop
        # Threads wait on `done`; an event loop gets `future`, resolved on the loop's own thread.
        self.done: threading.Event | None = None if loop else threading.Event()
        self.future: asyncio.Future[T] | None = loop.create_future() if loop else None
        self.value: T | None = None
        self.error: BaseException | None = None


class Writer:
    """Runs calls on a writer thread, each group of them in one transaction (module docstring)."""

    def __init__(self, begin: Callable[[], AbstractContextManager[Connection]]) -> None:
        self._begin = begin
        self._cond = threading.Condition()
        self._queue: deque[_Call[Any]] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._local = threading.local()  # on the writer thread: the group's transaction and connection
        self.groups = 0  # transactions committed, for tests and benchmarks
        self.calls = 0

    # ---- callers --------------------------------------------------------------------------------

    def run(self, fn: Callable[[Connection], T], lock_key: str = "") -> T:
        """`fn(connection)` in a group's write transaction; returns once that has committed. On the
        writer thread (inside a `submit`ted call), `fn` is that call's write."""
        if self.on_writer_thread():
            if self._local.wrote:
                raise RuntimeError("a store call writes once: two writes in one call would share a transaction")
            self._local.wrote = True
            return fn(self._connection())
        call: _Call[T] = _Call(lambda: self.run(fn), lock_key, None)
        self._put(call)
        assert call.done is not None
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.value  # type: ignore[return-value]

    def submit(self, fn: Callable[[], T], lock_key: str = "") -> asyncio.Future[T]:
        """Run `fn()` (a store method, which writes once) on the writer thread. Call on an event
        loop; await the result."""
        call: _Call[T] = _Call(fn, lock_key, asyncio.get_running_loop())
        self._put(call)
        assert call.future is not None
        return call.future

    def on_writer_thread(self) -> bool:
        return getattr(self._local, "writer", False)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the thread. A later call starts a new one."""
        with self._cond:
            thread, self._closed = self._thread, True
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _put(self, call: _Call[Any]) -> None:
        with self._cond:
            self._queue.append(call)
            # A closing thread still writes everything queued before it stops, this call included.
            if self._thread is None:
                self._closed = False
                self._thread = threading.Thread(target=self._loop, name="orch-db-writer", daemon=True)
                self._thread.start()
            self._cond.notify()

    # ---- the writer thread ----------------------------------------------------------------------

    def _connection(self) -> Connection:
        """The current group's connection, its transaction begun at the first write."""
        local = self._local
        if local.connection is None:
            local.transaction = self._begin()
            local.connection = local.transaction.__enter__()
        return local.connection

    def _loop(self) -> None:
        local = self._local
        local.writer, local.transaction, local.connection, local.wrote = True, None, None, False
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    self._thread = None
                    return
                group = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_GROUP))]
            try:
                self._write(group)
            except Exception as exc:
                # A bug in writing itself, not in a call: fail this group, keep the thread.
                log.exception("writing a group of %d failed", len(group))
                for call in group:
                    if call.error is None and call.value is None:
                        call.error = exc
            finally:
                self._settle(group)

    def _write(self, group: list[_Call[Any]]) -> None:
        # Calls that may wait for a row lock first, in key order (see the module docstring).
        group.sort(key=lambda call: (not call.lock_key, call.lock_key))
        try:
            self._transaction_of(group)
        except BaseException as exc:
            if len(group) == 1:
                group[0].error = exc
                return
            for call in group:
                try:
                    self._transaction_of([call])
                except BaseException as alone:
                    call.error = alone

    def _transaction_of(self, calls: list[_Call[Any]]) -> None:
        values = []
        try:
            for call in calls:
                self._local.wrote = False
                values.append(call.fn())
        except BaseException as exc:
            self._end(exc)
            raise
        if self._local.transaction is not None:
            self.groups += 1
        self._end(None)
        # Committed: only now may callers act on what they wrote.
        for call, value in zip(calls, values, strict=True):
            call.value = value
        self.calls += len(calls)

    def _end(self, error: BaseException | None) -> None:
        local = self._local
        transaction, local.transaction, local.connection = local.transaction, None, None
        if transaction is None:
            return
        if error is None:
            transaction.__exit__(None, None, None)  # commits; raises if the commit fails
        else:
            transaction.__exit__(type(error), error, error.__traceback__)

    def _settle(self, group: list[_Call[Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Call[Any]]] = {}
        for call in group:
            if call.done is not None:
                call.done.set()
            else:
                assert call.loop is not None
                by_loop.setdefault(call.loop, []).append(call)
        for loop, calls in by_loop.items():
            # One wake-up of the loop for the whole group, not one per call.
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(_resolve, calls)


def _resolve(calls: list[_Call[Any]]) -> None:
    for call in calls:
        future = call.future
        assert future is not None
        if future.done():  # canceled by its caller
            continue
        if call.error is not None:
            future.set_exception(call.error)
        else:
            future.set_result(call.value)
