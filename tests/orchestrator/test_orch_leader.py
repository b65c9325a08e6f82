"""Leadership of the singleton loops (orchestrator/leader.py), on PostgreSQL (advisory locks on a
connection of their own) and on a SQLite file (flock beside the database): one holder per role,
and when the holder lets go, dies, or loses its connection, another replica takes over within
the bound, while the old holder learns before its next run that it no longer leads."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from dippy_studio.orchestrator.app import create_app
from dippy_studio.orchestrator.audit import AuditSampler, SamplerPolicy
from dippy_studio.orchestrator.auditing import AuditQueue
from dippy_studio.orchestrator.blobs import FileBlobStore
from dippy_studio.orchestrator.leader import (
    ROLES,
    FileLeadership,
    Leadership,
    PostgresLeadership,
    for_store,
    role_key,
    server_keepalives,
)
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.orchestrator.store import Store, Success, job_row
from dippy_studio.protocol import signer_from_uri
from localnet_kit import wait_until

TAKEOVER_S = 2.0


@pytest.fixture
def replicas(db_url: str) -> Iterator[Callable[[], Leadership]]:
    """Makes replicas' leaderships on the `db_url` database (SQLite file or PostgreSQL)."""
    stores: list[Store] = []
    made: list[Leadership] = []

    def make() -> Leadership:
        store = Store(db_url)
        stores.append(store)
        made.append(for_store(store, TAKEOVER_S))
        return made[-1]

    yield make
    for leadership in made:
        leadership.close()
    for store in stores:
        store.close()


def takes_over(follower: Leadership, role: str) -> float:
    """Seconds until `follower`, asking every `retry_s` as a loop does, leads `role`."""
    started = time.monotonic()
    while not follower.lead(role):
        assert time.monotonic() - started < follower.takeover_s, f"{role} not taken within {follower.takeover_s}s"
        time.sleep(follower.retry_s)
    return time.monotonic() - started


def test_one_replica_holds_a_role_at_a_time(replicas):
    first, second = replicas(), replicas()
    assert first.lead("sweep")
    assert not second.lead("sweep")
    assert first.lead("sweep")  # checked again, still held
    assert not second.lead("sweep")
    assert (first.leads(), second.leads()) == (["sweep"], [])


def test_different_roles_can_be_held_by_different_replicas(replicas):
    first, second = replicas(), replicas()
    assert first.lead("sweep") and second.lead("probe")
    assert not first.lead("probe") and not second.lead("sweep")
    assert (first.leads(), second.leads()) == (["sweep"], ["probe"])


def test_release_and_close_hand_roles_over(replicas):
    first, second = replicas(), replicas()
    for role in ROLES:
        assert first.lead(role)
    first.release("sweep")
    assert first.leads() == sorted(set(ROLES) - {"sweep"})
    takes_over(second, "sweep")
    assert not first.lead("sweep")
    first.close()  # a replica shutting down
    for role in ROLES:
        takes_over(second, role)
    assert second.leads() == sorted(ROLES)


HOLDER = textwrap.dedent(
    """
    import sys, time
    from dippy_studio.orchestrator.leader import for_store
    from dippy_studio.orchestrator.store import Store

    leadership = for_store(Store(sys.argv[1]), 2.0)
    assert leadership.lead("audits")
    print("held", flush=True)
    time.sleep(120)
    """
)


@pytest.mark.timeout(60)
def test_a_replica_killed_with_its_role_frees_it_for_another(replicas, db_url):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, db_url], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        survivor = replicas()
        assert not survivor.lead("audits")
        holder.kill()  # kill -9: no chance to release anything
        holder.wait(10)
        takes_over(survivor, "audits")
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def _terminate_holder(url: str, role: str) -> int:
    """Terminate the PostgreSQL backend holding `role`'s advisory lock (as a dead network would
    end its session); returns how many it found."""
    key = role_key(role)
    with psycopg.connect(make_url(url).set(drivername="postgresql").render_as_string(False), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND classid = %s AND objid = %s AND objsubid = 1",
            [(key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF],
        ).fetchone()
    return int(row[0]) if row else 0


def test_postgres_a_holder_whose_connection_dies_stops_leading_and_another_takes_over(pg_databases):
    url = pg_databases()
    first, second = PostgresLeadership(make_url(url), TAKEOVER_S), PostgresLeadership(make_url(url), TAKEOVER_S)
    try:
        assert first.lead("sweep") and first.lead("probe")
        assert not second.lead("sweep")
        assert _terminate_holder(url, "sweep") == 1
        assert takes_over(second, "sweep") < TAKEOVER_S
        # Fencing: the old holder's next check runs on a dead connection, so it stops leading
        # every role it held there, and cannot take back the one the survivor now holds.
        assert not first.lead("sweep")
        assert first.leads() == []
        assert first.lead("probe")  # reconnected: a free role is its again
        second.close()
        takes_over(first, "sweep")
    finally:
        first.close()
        second.close()


def test_postgres_lock_session_drops_a_silent_peer_within_the_bound(pg_databases):
    """The server ends a session whose client vanished (no FIN: a dead machine) after its
    keepalives fail; those settings, on the lock session itself, fit the takeover bound."""
    for takeover_s in (6.0, 9.0, 15.0, 60.0, 300.0):
        timers = server_keepalives(takeover_s)
        silent_for = timers["tcp_keepalives_idle"] + timers["tcp_keepalives_interval"] * timers["tcp_keepalives_count"]
        retry_s = Leadership(takeover_s).retry_s
        # Dropped by the server, then taken at a follower's next try: within the bound.
        assert silent_for + retry_s <= takeover_s, takeover_s
        assert timers["tcp_user_timeout"] / 1000 + retry_s <= takeover_s, takeover_s
    url = pg_databases()
    leadership = PostgresLeadership(make_url(url), 15.0)
    try:
        assert leadership.lead("sync")
        shown = {
            name: leadership._conn.execute(f"SHOW {name}").fetchone()[0]  # the lock session's own settings
            for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout")
        }
        assert shown == {
            "tcp_keepalives_idle": "7",
            "tcp_keepalives_interval": "1",
            "tcp_keepalives_count": "3",
            "tcp_user_timeout": "10000",  # ms
        }
    finally:
        leadership.close()


def test_backends_follow_the_database(tmp_path, pg_databases):
    with contextlib.closing(Store(f"sqlite:///{tmp_path / 'orchestrator.sqlite'}")) as store:
        leadership = for_store(store, 15)
        assert isinstance(leadership, FileLeadership)
        assert leadership.path("sweep") == (tmp_path / "orchestrator.sqlite-leader-sweep").resolve()
        leadership.close()
    with contextlib.closing(Store(pg_databases())) as store:
        assert isinstance(for_store(store, 15), PostgresLeadership)
    # An in-memory database belongs to one process: it leads every role, whoever asks.
    with contextlib.closing(Store("sqlite://")) as store:
        one, two = for_store(store, 15), for_store(store, 15)
        assert all(one.lead(role) and two.lead(role) for role in ROLES)


def test_takeover_setting_must_be_positive():
    with pytest.raises(ValidationError, match="leader_takeover_s"):
        OrchestratorSettings(leader_takeover_s=0)
    with pytest.raises(ValueError, match="positive"):
        Leadership(0)


@pytest.mark.timeout(60)
def test_two_orchestrators_on_one_sqlite_file_split_no_loop_and_health_says_who_leads(tmp_path):
    """`serve --workers 2` on SQLite, in one process: the first orchestrator leads every singleton
    loop, the second none; when the first stops, the second takes them all."""
    settings = {
        "db_url": f"sqlite:///{tmp_path / 'orchestrator.sqlite'}",
        "leader_takeover_s": TAKEOVER_S,
        "audit": True,
        "dashboard": False,
    }
    signer = signer_from_uri("//leader/orchestrator")
    first = TestClient(create_app(OrchestratorSettings(data_dir=tmp_path / "one", **settings), signer=signer))
    second = TestClient(create_app(OrchestratorSettings(data_dir=tmp_path / "two", **settings), signer=signer))
    stopped = False
    first.__enter__()  # the lifespan starts its loops
    try:
        wait_until(lambda: first.get("/health").json()["leads"] == sorted(ROLES), 10, "the first to lead")
        with second:
            time.sleep(3 * TAKEOVER_S / 4)  # several tries of the second's loops
            assert second.get("/health").json() == {"status": "ok", "leads": []}
            assert first.get("/health").json()["leads"] == sorted(ROLES)
            first.__exit__(None, None, None)  # the first stops: its roles are released
            stopped = True
            started = time.monotonic()
            wait_until(lambda: second.get("/health").json()["leads"] == sorted(ROLES), 10, "the second to lead")
            assert time.monotonic() - started < TAKEOVER_S
    finally:
        if not stopped:
            first.__exit__(None, None, None)


def test_a_replica_not_leading_audits_flags_its_picks_and_learns_failures_from_the_store(db_url, tmp_path):
    """Every replica samples what it receives: its picks go to the database for the audits leader,
    and an audit failed on the leader puts the miner back on probation in this replica's sampler."""
    stores = [Store(db_url), Store(db_url)]
    leader, follower = (for_store(store, TAKEOVER_S) for store in stores)
    sampler = AuditSampler(SamplerPolicy(base_rate=1.0, probation_rate=1.0, probation_jobs=2, max_gap=1000))
    blobs = FileBlobStore(tmp_path / "blobs")
    settings = OrchestratorSettings(data_dir=tmp_path)
    queue = AuditQueue(stores[1], blobs, blobs, sampler, settings, leadership=follower, poll_s=0.1)
    try:
        assert leader.lead("audits")
        key = stores[0].create_api_key("client").key.id
        deadline = datetime.now(UTC) + timedelta(minutes=5)
        (job,) = stores[0].insert_jobs([job_row(key, "inference", {"prompt": "x"}, deadline, 60)])
        queue.start()
        job.miner_hotkey, job.result_blob = "5Miner", "ab" * 32  # as a callback hands it over
        assert queue.offer(job)
        wait_until(lambda: stores[0].flagged_without_verdict() == [job.id], 10, "the pick to be flagged")
        sampler.decide("5Miner", "inference")
        assert sampler.state("5Miner", "inference").probation_left == 0
        stores[0].add_audit(job.id, "5Miner", "fail")  # judged on the leader
        wait_until(lambda: sampler.state("5Miner", "inference").probation_left == 2, 10, "probation again")
        assert follower.leads() == []
    finally:
        queue.stop()
        leader.close()
        follower.close()
        for store in stores:
            store.close()


def test_an_audit_that_cannot_read_the_result_says_why_and_blames_nobody(db_url, tmp_path):
    """Replicas on several machines without a shared bucket: the result is on the disk of the
    replica that took the callback, not on the audits leader's. The leader stores an inconclusive
    verdict that says so (operators see it on the dashboard) rather than give up in its log."""
    store = Store(db_url)
    sampler = AuditSampler(SamplerPolicy(base_rate=1.0, probation_rate=1.0, probation_jobs=2, max_gap=1000))
    blobs = FileBlobStore(tmp_path / "blobs")  # the leader's own disk: the result is not on it
    queue = AuditQueue(store, blobs, blobs, sampler, OrchestratorSettings(data_dir=tmp_path), poll_s=0.1)
    try:
        key = store.create_api_key("client").key.id
        payload = {"prompt": "x", "seed": 1, "width": 64, "height": 64, "steps": 4, "guidance": 3.5, "loras": []}
        deadline = datetime.now(UTC) + timedelta(minutes=5)
        (job,) = store.insert_jobs([job_row(key, "inference", payload, deadline, 60)])
        assert store.claim_for_dispatch(1, kinds=["inference"], assign=lambda job, tried: ("5Miner", 1))
        result = "ab" * 32  # stored by the replica on the other machine
        assert store.succeed(
            job.id, Success(result_sha256=result, result_bytes=100, fingerprint=None, timings={}), attempt=1
        )
        queue.start()
        assert queue.offer(store.load_job(job.id))
        [audit] = wait_until(lambda: store.list_audits(job_id=job.id), 20, "the verdict")
        assert (audit.verdict, audit.miner_hotkey) == ("inconclusive", "5Miner")
        reason = audit.evidence["verdict"]["reason"]
        assert result in reason and "DIPPY_ORCH_BLOB_URL=s3://" in reason, reason
        assert store.flagged_without_verdict() == []  # judged: not taken up again
    finally:
        queue.stop()
        store.close()


def test_postgres_a_connection_error_without_a_message_is_logged_not_raised(monkeypatch, caplog):
    """A driver error whose text is blank still reads as "not leading", with the error logged."""
    leadership = PostgresLeadership(make_url("postgresql://nobody@127.0.0.1:1/none"), TAKEOVER_S)

    def fails() -> None:
        raise psycopg.OperationalError(" \n ")

    monkeypatch.setattr(leadership, "_connection", fails)
    with caplog.at_level("WARNING", logger="dippy_studio.orchestrator.leader"):
        assert leadership.lead("sweeper") is False
    assert "leadership connection failed: OperationalError" in caplog.text
