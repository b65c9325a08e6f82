"""Writes from many threads and from an event loop share transactions on one writer thread, and
none is lost or written twice; each caller gets its own result or error."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from dippy_studio.orchestrator.writer import Writer


class _Transactions:
    """A stand-in for engine.begin(): records each transaction's operations and its end."""

    def __init__(self) -> None:
        self.committed: list[list[str]] = []
        self.rolled_back = 0

    @contextlib.contextmanager
    def begin(self) -> Iterator[list[str]]:
        ops: list[str] = []
        try:
            yield ops
        except BaseException:
            self.rolled_back += 1
            raise
        self.committed.append(ops)


@pytest.fixture
def db() -> _Transactions:
    return _Transactions()


def _queued(writer: Writer, count: int) -> None:
    """Wait until `count` calls wait in the writer's queue (up to 10 s), rather than sleeping a
    fixed time that a loaded machine may not give a thread to get there."""
    end = time.monotonic() + 10
    while True:
        with writer._cond:
            if len(writer._queue) >= count:
                return
        assert time.monotonic() < end, f"{count} calls never queued"
        time.sleep(0.005)


@pytest.fixture
def writer(db: _Transactions) -> Iterator[Writer]:
    writer = Writer(db.begin)  # type: ignore[arg-type]
    yield writer
    writer.close()


def test_each_caller_gets_its_result_after_fewer_commits_than_calls(db: _Transactions, writer: Writer) -> None:
    def write(conn: list[str], name: str) -> str:
        time.sleep(0.001)  # a statement's worth of time, so others queue up meanwhile
        conn.append(name)
        return name.upper()

    results: dict[str, str] = {}

    def client(k: int) -> None:
        for i in range(30):
            name = f"w{k}-{i}"
            results[name] = writer.run(lambda conn, name=name: write(conn, name))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {f"w{k}-{i}": f"W{k}-{i}" for k in range(8) for i in range(30)}
    written = [name for ops in db.committed for name in ops]
    assert sorted(written) == sorted(results)  # each exactly once
    assert len(db.committed) < len(written) / 2  # shared transactions
    assert writer.groups == len(db.committed) and writer.calls == len(written)


def test_a_failing_call_fails_only_its_own_caller(db: _Transactions, writer: Writer) -> None:
    gate, held = threading.Event(), threading.Event()
    outcomes: dict[str, object] = {}

    def first(conn: list[str]) -> str:
        held.set()
        gate.wait(30)  # hold the first transaction open until the others have queued
        conn.append("first")
        return "first"

    def good(conn: list[str]) -> str:
        conn.append("good")
        return "good"

    def bad(conn: list[str]) -> str:
        conn.append("bad")
        raise ValueError("constraint failed")

    def call(name: str, fn: Callable[[list[str]], str]) -> None:
        try:
            outcomes[name] = writer.run(fn)
        except ValueError as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=call, args=("first", first))]
    threads[0].start()
    assert held.wait(10)  # the writer is in the first transaction
    threads += [threading.Thread(target=call, args=(name, fn)) for name, fn in (("good", good), ("bad", bad))]
    for thread in threads[1:]:
        thread.start()
    _queued(writer, 2)  # both wait for the next group
    gate.set()
    for thread in threads:
        thread.join()
    assert outcomes["first"] == "first" and outcomes["good"] == "good"
    assert isinstance(outcomes["bad"], ValueError)
    # The group of good and bad was rolled back, and good ran again alone and committed.
    assert db.rolled_back >= 1
    assert db.committed == [["first"], ["good"]]


def test_a_call_writes_once(db: _Transactions, writer: Writer) -> None:
    # Two writes in one call would share a transaction that neither chose: refused, and nothing of
    # the call is written.
    def twice(conn: list[str]) -> str:
        conn.append("outer")
        return writer.run(lambda inner: inner.append("inner") or "nested")

    with pytest.raises(RuntimeError, match="writes once"):
        writer.run(twice)

    async def main() -> list[object]:
        return await asyncio.gather(
            writer.submit(lambda: writer.run(lambda c: c.append("a")) or writer.run(lambda c: c.append("b"))),
            writer.submit(lambda: writer.run(lambda c: c.append("alone") or "alone")),
            return_exceptions=True,
        )

    refused, alone = asyncio.run(main())
    assert isinstance(refused, RuntimeError) and alone == "alone"
    assert db.committed == [["alone"]]


def _queued_behind_a_held_transaction(writer: Writer, calls: list[tuple[str, str]]) -> None:
    """Run calls that write their name (name, lock key), each from its own thread in this order,
    while the writer's first transaction ("first") is held open, so they all queue for the next."""
    gate, held = threading.Event(), threading.Event()

    def first(conn: list[str]) -> None:
        held.set()
        gate.wait(30)
        conn.append("first")

    threads = [threading.Thread(target=writer.run, args=(first,))]
    threads[0].start()
    assert held.wait(10)  # the writer is in the first transaction
    for n, (name, key) in enumerate(calls, start=1):
        threads.append(threading.Thread(target=writer.run, args=(lambda conn, name=name: conn.append(name), key)))
        threads[-1].start()
        _queued(writer, n)  # queued in this order, whatever the machine's load
    gate.set()
    for thread in threads:
        thread.join()


def test_a_group_locks_rows_in_key_order_whatever_the_arrival_order(db: _Transactions, writer: Writer) -> None:
    # Two replicas' groups that touch the same jobs must lock them in one order, or they deadlock.
    _queued_behind_a_held_transaction(writer, [(key, key) for key in ("job-c", "job-a", "job-b")])
    assert db.committed == [["first"], ["job-a", "job-b", "job-c"]]


def test_calls_that_never_wait_for_a_row_run_after_those_that_may(db: _Transactions, writer: Writer) -> None:
    _queued_behind_a_held_transaction(writer, [("claim", ""), ("job-b", "job-b"), ("insert", ""), ("job-a", "job-a")])
    assert db.committed == [["first"], ["job-a", "job-b", "claim", "insert"]]


def test_an_event_loop_submits_without_blocking_and_shares_transactions(db: _Transactions, writer: Writer) -> None:
    def write(name: str) -> str:
        time.sleep(0.001)
        writer.run(lambda conn: conn.append(name))
        return name.upper()

    async def main() -> list[str]:
        # 200 calls in flight at once from one thread: the loop never waits on the writer.
        return await asyncio.gather(*(writer.submit(lambda k=k: write(f"op{k}")) for k in range(200)))

    assert asyncio.run(main()) == [f"OP{k}" for k in range(200)]
    written = [name for ops in db.committed for name in ops]
    assert sorted(written) == sorted(f"op{k}" for k in range(200))
    assert len(db.committed) < 20  # the writer took what queued up while it wrote


def test_a_submitted_call_fails_alone_and_one_that_only_reads_opens_no_transaction(
    db: _Transactions, writer: Writer
) -> None:
    def call(name: str, fail: bool = False) -> str:
        writer.run(lambda conn: conn.append(name))
        if fail:
            raise ValueError(f"{name} broke a constraint")
        return name

    async def main() -> list[object]:
        return await asyncio.gather(
            writer.submit(lambda: call("good")),
            writer.submit(lambda: call("bad", fail=True)),
            writer.submit(lambda: "no transaction"),
            return_exceptions=True,
        )

    good, bad, reads_only = asyncio.run(main())
    assert good == "good" and reads_only == "no transaction"
    assert isinstance(bad, ValueError)
    assert ["good"] in db.committed and not any("bad" in ops for ops in db.committed)
    assert [] not in db.committed


def test_a_closed_writer_writes_what_was_queued_and_restarts_on_the_next_write(
    db: _Transactions, writer: Writer
) -> None:
    assert writer.run(lambda conn: conn.append("one") or 1) == 1
    writer.close()
    assert not writer.on_writer_thread()
    assert writer.run(lambda conn: conn.append("two") or 2) == 2
    writer.close()
    assert db.committed == [["one"], ["two"]]


@pytest.mark.timeout(30)
def test_a_bug_in_writing_a_group_fails_that_group_but_not_the_writer(db: _Transactions, writer: Writer) -> None:
    async def main() -> list[object]:
        started, gate = threading.Event(), threading.Event()
        busy = writer.submit(lambda: started.set() or gate.wait(5))
        started.wait(5)  # the writer is in the first group: the next two make a group of their own
        # Lock keys that cannot be ordered: sorting the group raises, outside any call.
        broken = [writer.submit(lambda: "never", lock_key=key) for key in (1, b"x")]  # type: ignore[arg-type]
        gate.set()
        await busy
        return await asyncio.wait_for(asyncio.gather(*broken, return_exceptions=True), 5)

    assert all(isinstance(outcome, TypeError) for outcome in asyncio.run(main()))
    still = threading.Thread(target=lambda: writer.run(lambda conn: conn.append("after")), daemon=True)
    still.start()
    still.join(5)
    assert not still.is_alive(), "the writer thread is gone: later writes wait forever"
    assert db.committed == [["after"]]
