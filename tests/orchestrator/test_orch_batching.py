"""Small writes from many threads coalesce into batches, and none is lost or written twice;
grouped transactions give each caller its own result or error."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from dippy_studio.orchestrator.batching import Coalescer, GroupCommit


def test_concurrent_adds_are_written_once_each_in_fewer_batches() -> None:
    batches: list[list[int]] = []

    def write(batch: list[int]) -> None:
        time.sleep(0.002)  # a transaction's worth of time, so others queue up meanwhile
        batches.append(batch)

    coalescer: Coalescer[int] = Coalescer("test", write)
    threads = [threading.Thread(target=lambda k=k: [coalescer.add(k * 100 + i) for i in range(50)]) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    coalescer.flush()
    written = [item for batch in batches for item in batch]
    assert sorted(written) == sorted(k * 100 + i for k in range(8) for i in range(50))
    assert len(batches) < len(written)


def test_a_failed_batch_is_logged_and_later_writes_go_on(caplog) -> None:
    written: list[str] = []

    def write(batch: list[str]) -> None:
        if "bad" in batch:
            raise RuntimeError("database down")
        written.extend(batch)

    coalescer: Coalescer[str] = Coalescer("running", write)
    coalescer.add("bad")
    coalescer.add("good")
    assert written == ["good"]
    assert "running: writing a batch of 1 failed" in caplog.text


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
