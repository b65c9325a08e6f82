"""Small writes from many threads coalesce into batches, and none is lost or written twice."""

from __future__ import annotations

import threading
import time

from dippy_studio.orchestrator.batching import Coalescer


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
