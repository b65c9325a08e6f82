"""Two orchestrator processes claiming from one database never dispatch the same job twice."""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dippy_studio.orchestrator.store import Store, job_row

JOBS = 200


def _collect(results, workers, timeout_s: float = 90) -> list[list[str]]:
    """Each worker's claims; fails at once (not after the timeout) when a worker dies."""
    claims: list[list[str]] = []
    deadline = time.monotonic() + timeout_s
    while len(claims) < len(workers):
        try:
            claims.append(results.get(timeout=0.5))
        except queue.Empty:
            crashed = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            assert not crashed, f"a claiming process crashed (exit codes {crashed}); see its stderr above"
            assert time.monotonic() < deadline, "claiming processes did not finish"
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    return claims


@pytest.mark.timeout(120)
def test_two_processes_claim_every_job_exactly_once(store: Store, db_url: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # spawned children inherit sys.path
    import orch_claim_worker

    key = store.create_api_key("load").key.id
    deadline = datetime.now(UTC) + timedelta(hours=1)
    rows = [job_row(key, "inference", {"n": n}, deadline, 60) for n in range(JOBS)]
    created = {job.id for job in store.insert_jobs(rows)}

    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(2), ctx.Queue()
    workers = [
        ctx.Process(target=orch_claim_worker.claim_until_empty, args=(db_url, start, results, 3)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    claims = _collect(results, workers)

    counts = Counter(job_id for claim in claims for job_id in claim)
    assert [job_id for job_id, n in counts.items() if n > 1] == []
    assert set(counts) == created
    assert all(claims), "both processes should have taken part"
    # The database agrees: every job was dispatched once, none is left behind.
    jobs = [store.load_job(job_id) for job_id in created]
    assert {(job.status, job.attempts) for job in jobs} == {("dispatched", 1)}
    # Each job went to one miner, with one attempt on record for it.
    attempts = Counter(attempt.job_id for attempt in store.list_attempts())
    assert attempts == Counter(created)
    assert len({job.miner_hotkey for job in jobs}) == 2
