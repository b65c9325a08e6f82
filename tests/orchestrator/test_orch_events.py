"""Replicas on one PostgreSQL hear each other's job events (LISTEN/NOTIFY), and only once committed."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert
from sqlalchemy.engine import make_url

from dippy_studio.orchestrator.models import Job
from dippy_studio.orchestrator.store import Store, job_row


class Heard:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self._cond = threading.Condition()

    def __call__(self, status: str, job_id: str) -> None:
        with self._cond:
            self.events.append((status, job_id))
            self._cond.notify_all()

    def wait_for(self, event: tuple[str, str], timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: event in self.events, timeout)


def wait_listening(url: str, timeout: float = 30.0) -> None:
    """Wait until a session on this database has run its LISTEN (the listener's thread connects
    and listens in its own time, which a loaded machine may make long)."""
    import psycopg

    admin = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND state = 'idle' AND query LIKE 'LISTEN %'"
    )
    end = time.monotonic() + timeout
    with psycopg.connect(admin, autocommit=True) as conn:  # each query sees the activity anew
        while not conn.execute(query).fetchone()[0]:
            assert time.monotonic() < end, "the listener never listened"
            time.sleep(0.05)


@pytest.mark.timeout(60)
def test_a_replica_hears_jobs_queued_and_finished_by_another_after_commit(pg_databases):
    url = pg_databases()
    writer, reader = Store.open(url), Store(url)
    heard = Heard()
    listener = reader.listen(heard)
    assert listener is not None
    try:
        wait_listening(url)  # the listener has its connection
        key = writer.create_api_key("client").key.id
        deadline = datetime.now(UTC) + timedelta(minutes=5)
        (job,) = writer.insert_jobs([job_row(key, "inference", {"prompt": "x"}, deadline, 60)])
        assert heard.wait_for(("queued", job.id))
        writer.claim_for_dispatch(1, kinds=["inference"], assign=lambda job, tried: ("hotkey", 1))
        writer.transition(job.id, "dispatched", "running")
        writer.transition(job.id, "running", "failed", error="boom")
        assert heard.wait_for(("failed", job.id))
        # Moves between active states are nobody's business but the dispatcher's own.
        assert [status for status, job_id in heard.events if job_id == job.id] == ["queued", "failed"]

        # A transaction that rolls back announces nothing.
        lost = job_row(key, "inference", {"prompt": "y"}, deadline, 60)
        with pytest.raises(RuntimeError), writer.engine.begin() as conn:
            conn.execute(insert(Job.__table__), [lost])
            raise RuntimeError("rolled back")
        (after,) = writer.insert_jobs([job_row(key, "inference", {"prompt": "z"}, deadline, 60)])
        assert heard.wait_for(("queued", after.id))
        assert ("queued", lost["id"]) not in heard.events
    finally:
        listener.stop()
        writer.close()
        reader.close()


def test_sqlite_has_no_listener(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'o.sqlite'}")
    try:
        assert store.listen(lambda status, job_id: None) is None
    finally:
        store.close()
