"""Writes from many threads and from an event loop share transactions on one writer thread, and
none is lost or written twice; each caller gets its own result or error."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import pytest

from dippy_studio.orchestrator.batching import Gathered, GroupCommit


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


def test_group_commit_returns_each_result_after_fewer_commits() -> None:
    db = _Transactions()
    group = GroupCommit(db.begin)  # type: ignore[arg-type]

    def write(conn: list[str], name: str) -> str:
        time.sleep(0.001)  # a statement's worth of time, so others queue up meanwhile
        conn.append(name)
        return name.upper()

    results: dict[str, str] = {}

    def client(k: int) -> None:
        for i in range(30):
            name = f"w{k}-{i}"
            results[name] = group.run(lambda conn, name=name: write(conn, name))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {f"w{k}-{i}": f"W{k}-{i}" for k in range(8) for i in range(30)}
    written = [name for ops in db.committed for name in ops]
    assert sorted(written) == sorted(results)  # each exactly once
    assert len(db.committed) < len(written) / 2  # shared transactions
    assert group.groups == len(db.committed) and group.ops == len(written)


def test_a_failing_operation_fails_only_its_own_caller() -> None:
    db = _Transactions()
    group = GroupCommit(db.begin)  # type: ignore[arg-type]
    gate = threading.Event()
    outcomes: dict[str, object] = {}

    def first(conn: list[str]) -> str:
        gate.wait(5)  # hold the first transaction open until the others have queued
        conn.append("first")
        return "first"

    def good(conn: list[str]) -> str:
        conn.append("good")
        return "good"

    def bad(conn: list[str]) -> str:
        conn.append("bad")
        raise ValueError("constraint failed")

    def call(name: str, fn) -> None:
        try:
            outcomes[name] = group.run(fn)
        except ValueError as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=call, args=("first", first))]
    threads[0].start()
    time.sleep(0.05)
    threads += [threading.Thread(target=call, args=(name, fn)) for name, fn in (("good", good), ("bad", bad))]
    for thread in threads[1:]:
        thread.start()
    time.sleep(0.05)
    gate.set()
    for thread in threads:
        thread.join()
    assert outcomes["first"] == "first" and outcomes["good"] == "good"
    assert isinstance(outcomes["bad"], ValueError)
    # The group of good and bad was rolled back, and good ran again alone and committed.
    assert db.rolled_back >= 1
    assert [ops for ops in db.committed] == [["first"], ["good"]]


def test_a_nested_run_joins_the_transaction_in_progress() -> None:
    db = _Transactions()
    group = GroupCommit(db.begin)  # type: ignore[arg-type]

    def outer(conn: list[str]) -> str:
        conn.append("outer")
        return group.run(lambda inner: inner.append("inner") or "nested")

    assert group.run(outer) == "nested"
    assert db.committed == [["outer", "inner"]]


def _queued_behind_a_held_transaction(group: GroupCommit, ops: list[tuple[str, str]]) -> None:
    """Run ops that write their name (name, lock key), each from its own thread in this order,
    while the group's first transaction ("first") is held open, so they all queue for the next."""
    gate = threading.Event()
    threads = [threading.Thread(target=group.run, args=(lambda conn: gate.wait(5) and conn.append("first"),))]
    threads[0].start()
    time.sleep(0.05)
    for name, key in ops:
        threads.append(threading.Thread(target=group.run, args=(lambda conn, name=name: conn.append(name), key)))
        threads[-1].start()
        time.sleep(0.02)
    gate.set()
    for thread in threads:
        thread.join()


def test_a_group_locks_rows_in_key_order_whatever_the_arrival_order() -> None:
    # Two replicas' groups that touch the same jobs must lock them in one order, or they deadlock.
    db = _Transactions()
    group = GroupCommit(db.begin)  # type: ignore[arg-type]
    _queued_behind_a_held_transaction(group, [(key, key) for key in ("job-c", "job-a", "job-b")])
    assert db.committed == [["first"], ["job-a", "job-b", "job-c"]]


def test_operations_that_never_wait_for_a_row_run_after_those_that_may() -> None:
    db = _Transactions()
    group = GroupCommit(db.begin)  # type: ignore[arg-type]
    _queued_behind_a_held_transaction(group, [("claim", ""), ("job-b", "job-b"), ("insert", ""), ("job-a", "job-a")])
    assert db.committed == [["first"], ["job-a", "job-b", "claim", "insert"]]


def test_an_event_loop_submits_without_blocking_and_shares_transactions() -> None:
    db = _Transactions()
    group = GroupCommit(db.begin)  # type: ignore[arg-type]

    def write(name: str) -> str:
        time.sleep(0.001)
        group.connection().append(name)
        return name.upper()

    async def main() -> list[str]:
        # 200 operations in flight at once from one thread: the loop never waits on the writer.
        return await asyncio.gather(*(group.submit(lambda k=k: write(f"op{k}")) for k in range(200)))

    try:
        assert asyncio.run(main()) == [f"OP{k}" for k in range(200)]
    finally:
        group.close()
    written = [name for ops in db.committed for name in ops]
    assert sorted(written) == sorted(f"op{k}" for k in range(200))
    assert len(db.committed) < 20  # the writer took what queued up while it wrote


def test_a_submitted_operation_fails_alone_and_a_failed_prepare_skips_it() -> None:
    db = _Transactions()
    group = GroupCommit(db.begin)  # type: ignore[arg-type]
    ran: list[str] = []

    def op(name: str, fail: bool = False) -> str:
        group.connection().append(name)
        if fail:
            raise ValueError(f"{name} broke a constraint")
        return name

    def refuse() -> None:
        raise PermissionError("replayed")

    async def main() -> list[object]:
        return await asyncio.gather(
            group.submit(lambda: op("good")),
            group.submit(lambda: op("bad", fail=True)),
            group.submit(lambda: ran.append("skipped") or "skipped", prepare=refuse),
            group.submit(lambda: op("reads only") and "no transaction"),
            return_exceptions=True,
        )

    try:
        good, bad, skipped, alone = asyncio.run(main())
    finally:
        group.close()
    assert good == "good" and alone == "no transaction"
    assert isinstance(bad, ValueError) and isinstance(skipped, PermissionError)
    assert ran == []  # its prepare failed, so it never ran
    assert ["good"] in db.committed and not any("bad" in ops for ops in db.committed)


def test_a_closed_group_writes_what_was_queued_and_restarts_on_the_next_write() -> None:
    db = _Transactions()
    group = GroupCommit(db.begin)  # type: ignore[arg-type]
    assert group.run(lambda conn: conn.append("one") or 1) == 1
    group.close()
    assert not group.on_writer_thread()
    assert group.run(lambda conn: conn.append("two") or 2) == 2
    group.close()
    assert db.committed == [["one"], ["two"]]


def test_connection_is_only_for_the_writer_thread() -> None:
    group = GroupCommit(_Transactions().begin)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="writer thread"):
        group.connection()


def test_gathered_work_is_done_once_per_group_and_committed_on_its_own() -> None:
    db = _Transactions()
    group = GroupCommit(db.begin)  # type: ignore[arg-type]
    flushes: list[list[int]] = []

    def count(items: list[int]) -> list[int]:
        flushes.append(items)
        group.connection().append(f"counted {len(items)}")
        return [item * 10 for item in items]

    def use(item: Gathered[int, int], fail: bool) -> int:
        group.connection().append(f"used {item.item}")
        if fail:
            raise ValueError("the group's transaction fails")
        assert item.result is not None
        return item.result

    async def main() -> list[object]:
        items = [Gathered("count", k, count) for k in range(1, 5)]
        gate = threading.Event()
        busy = group.submit(lambda: gate.wait(5))  # holds the writer while the rest queue up
        queued = [group.submit(lambda g=g: use(g, fail=g.item == 3), prepare=g) for g in items]
        gate.set()
        await busy
        return await asyncio.gather(*queued, return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        group.close()
    assert results[:2] == [10, 20] and isinstance(results[2], ValueError) and results[3] == 40
    assert flushes == [[1, 2, 3, 4]]  # once, for everyone, in order
    # Committed before the group's transaction, and kept although that one was rolled back.
    assert db.committed[0] == ["counted 4"] and db.rolled_back >= 1


def test_a_failed_flush_fails_only_the_operations_that_gathered_into_it() -> None:
    db = _Transactions()
    group = GroupCommit(db.begin)  # type: ignore[arg-type]

    def broken(items: list[str]) -> list[str]:
        group.connection().append("half a flush")
        raise RuntimeError("database down")

    async def main() -> list[object]:
        return await asyncio.gather(
            group.submit(lambda: "never", prepare=Gathered("broken", "a", broken)),
            group.submit(lambda: group.connection().append("other") or "fine"),
            return_exceptions=True,
        )

    try:
        failed, fine = asyncio.run(main())
    finally:
        group.close()
    assert isinstance(failed, RuntimeError) and fine == "fine"
    assert db.committed == [["other"]] and db.rolled_back == 1


def test_a_bug_in_writing_a_group_fails_that_group_but_not_the_writer(caplog) -> None:
    db = _Transactions()
    group = GroupCommit(db.begin)  # type: ignore[arg-type]

    async def main() -> list[object]:
        started, gate = threading.Event(), threading.Event()
        busy = group.submit(lambda: started.set() or gate.wait(5))
        started.wait(5)  # the writer is in the first group: the next two make a group of their own
        # Lock keys that cannot be ordered: sorting the group raises, outside any operation.
        broken = [group.submit(lambda: "never", lock_key=key) for key in (1, b"x")]  # type: ignore[arg-type]
        gate.set()
        await busy
        return await asyncio.gather(*broken, return_exceptions=True)

    try:
        assert all(isinstance(outcome, TypeError) for outcome in asyncio.run(main()))
        assert group.run(lambda conn: conn.append("after") or "still writing") == "still writing"
    finally:
        group.close()
    assert "writing a group of 2 failed" in caplog.text and db.committed == [["after"]]
