"""Usage and quotas per API key: what a key is metered for (succeeded jobs only, by UTC day),
and a quota that refuses the submission it has no room for, on SQLite and PostgreSQL; then the
same totals through two orchestrator replicas on one PostgreSQL database."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from dippy_studio.orchestrator import usage
from dippy_studio.orchestrator.db import make_engine, upgrade
from dippy_studio.orchestrator.errors import QuotaExceeded
from dippy_studio.orchestrator.models import Job
from dippy_studio.orchestrator.states import RequestStatus
from dippy_studio.orchestrator.store import Store, Success, job_row
from dippy_studio.orchestrator.usage import Limits, Quota, job_units
from localnet_kit import wait_until

T0 = datetime(2030, 1, 31, 23, 0, 0, tzinfo=UTC)
KINDS = ["inference", "training"]


def image(width: int = 64, height: int = 64, steps: int = 4) -> dict[str, Any]:
    return {"prompt": "a cat", "seed": 1, "width": width, "height": height, "steps": steps, "guidance": 1.0}


def submit(store: Store, key_id: str, at: datetime, kind: str = "inference", payload: dict | None = None) -> Job:
    row = job_row(key_id, kind, payload or image(), at + timedelta(hours=2), 60, now=at)
    return store.insert_jobs([row])[0]


def finish(store: Store, job: Job, at: datetime, ok: bool = True) -> None:
    claimed = store.claim_for_dispatch(10, now=at, kinds=KINDS, assign=lambda job, tried: ("miner", 1))
    assert job.id in [j.id for j in claimed]
    if ok:
        assert store.succeed(job.id, Success("ab" * 32, 10, None, {}), now=at, attempt=1)
    else:
        assert store.transition(job.id, RequestStatus.dispatched, RequestStatus.failed, now=at, error="miner failed")


def day_of(report: dict[str, Any], date: str) -> dict[str, Any]:
    return next(day for day in report["days"] if day["date"] == date)


def test_a_job_is_metered_by_what_it_asks_for():
    assert job_units("inference", image(1024, 512, 28)).as_dict() == {
        "images": 1,
        "megapixel_steps": pytest.approx(1024 * 512 / 1e6 * 28),
        "training_steps": 0,
    }
    assert job_units("edit", {**image(512, 512, 10), "task": "edit"}).images == 1
    assert job_units("training", {"steps": 300, "rank": 4}).as_dict() == {
        "images": 0,
        "megapixel_steps": 0,
        "training_steps": 300,
    }


def test_usage_counts_succeeded_jobs_on_the_utc_day_they_succeed(store: Store):
    key = store.create_api_key("client").key
    other = store.create_api_key("other").key
    late = submit(store, key.id, T0)
    finish(store, late, T0 + timedelta(minutes=30))  # Jan 31
    big = submit(store, key.id, T0, payload=image(128, 64, 8))
    finish(store, big, T0 + timedelta(hours=1, minutes=1))  # Feb 1: after midnight UTC
    training = submit(store, key.id, T0, kind="training", payload={"steps": 250, "rank": 4})
    finish(store, training, T0 + timedelta(hours=1, minutes=2))
    finish(store, submit(store, key.id, T0 + timedelta(hours=1)), T0 + timedelta(hours=1, minutes=3), ok=False)
    store.cancel_job(submit(store, key.id, T0).id, key.id, now=T0)
    finish(store, submit(store, other.id, T0), T0 + timedelta(minutes=5))  # another key's

    report = store.key_usage(store.get_api_key(key.id), days=3, now=T0 + timedelta(hours=2))
    assert report["key_id"] == key.id and report["quota"] is None
    assert [day["date"] for day in report["days"]] == ["2030-01-30", "2030-01-31", "2030-02-01"]
    assert day_of(report, "2030-01-30") == {
        "date": "2030-01-30",
        "images": 0,
        "megapixel_steps": 0,
        "training_steps": 0,
    }
    assert day_of(report, "2030-01-31")["images"] == 1
    assert day_of(report, "2030-01-31")["megapixel_steps"] == pytest.approx(64 * 64 / 1e6 * 4)
    assert day_of(report, "2030-02-01") == {
        "date": "2030-02-01",
        "images": 1,
        "megapixel_steps": pytest.approx(128 * 64 / 1e6 * 8),
        "training_steps": 250,
    }


def test_a_spent_daily_quota_refuses_until_a_new_day_or_a_raised_quota(store: Store):
    key = store.create_api_key("client").key
    store.set_api_key_quota(key.id, Quota(day=Limits(images=2)))
    for minute in (0, 1):
        finish(store, submit(store, key.id, T0 + timedelta(minutes=minute)), T0 + timedelta(minutes=minute + 1))
    with pytest.raises(QuotaExceeded) as refused:
        submit(store, key.id, T0 + timedelta(minutes=5))
    reason = refused.value.reason
    assert "daily quota of 2 images reached: 2 used today (UTC)" in reason
    assert "resets at 2030-02-01T00:00:00Z" in reason
    assert store.key_usage(store.get_api_key(key.id), days=1, now=T0)["quota"]["day"]["images"] == 2

    # After midnight UTC the day's quota is fresh.
    finish(store, submit(store, key.id, T0 + timedelta(hours=1, minutes=1)), T0 + timedelta(hours=1, minutes=2))
    # Raised, it admits again on the same day.
    store.set_api_key_quota(key.id, Quota(day=Limits(images=3)))
    submit(store, key.id, T0 + timedelta(minutes=6))
    # Cleared: unlimited.
    assert store.set_api_key_quota(key.id, Quota()).quota is None
    submit(store, key.id, T0 + timedelta(minutes=7))


def test_unfinished_jobs_hold_their_units_until_they_fail(store: Store):
    """Queued and running jobs may still succeed, so they count: no flood of queued jobs past a
    quota. A job that fails gives its units back."""
    key = store.create_api_key("client").key
    store.set_api_key_quota(key.id, Quota(month=Limits(megapixel_steps=64 * 64 / 1e6 * 4 * 2)))
    first = submit(store, key.id, T0)
    submit(store, key.id, T0)
    with pytest.raises(QuotaExceeded, match="monthly quota of .* megapixel-steps reached: 0 used this month"):
        submit(store, key.id, T0)
    finish(store, first, T0 + timedelta(minutes=1), ok=False)
    submit(store, key.id, T0 + timedelta(minutes=2))
    # A request bigger than the whole quota is refused outright, and says what it needs.
    store.set_api_key_quota(key.id, Quota(day=Limits(training_steps=100)))
    with pytest.raises(QuotaExceeded, match="this request needs 500"):
        submit(store, key.id, T0, kind="training", payload={"steps": 500})


def test_quota_limits_are_validated():
    with pytest.raises(ValueError):
        Quota.model_validate({"day": {"images": -1}})
    with pytest.raises(ValueError):
        Quota.model_validate({"week": {"images": 1}})
    assert Quota.model_validate({"day": {"images": None}}).stored() is None


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'orchestrator.sqlite'}"
    return request.getfixturevalue("pg_databases")()


def test_the_migration_meters_the_jobs_that_came_before_it(empty_url: str):
    upgrade(empty_url, "0004")
    engine = make_engine(empty_url)
    stamp = sa.DateTime(timezone=True)
    keys = sa.table(
        "api_keys",
        *(sa.column(c) for c in ("id", "name", "key_hash", "webhook_secret", "rate_limit_per_minute")),
        sa.column("created_at", stamp),
    )
    jobs = sa.table(
        "jobs",
        *(sa.column(c) for c in ("id", "api_key_id", "kind", "status", "attempts", "max_attempts")),
        *(sa.column(c) for c in ("attempt_timeout_s", "webhook_state", "webhook_attempts", "audit")),
        *(sa.column(c, sa.JSON) for c in ("payload", "timings")),
        *(sa.column(c, stamp) for c in ("created_at", "updated_at", "deadline", "finished_at")),
    )
    at = T0.replace(tzinfo=None) if empty_url.startswith("sqlite") else T0
    key_id = "key_0123456789abcdef"
    common = {"api_key_id": key_id, "attempts": 1, "max_attempts": 3, "attempt_timeout_s": 60.0,
              "webhook_state": "none", "webhook_attempts": 0, "audit": False, "timings": {}, "status": "queued",
              "created_at": at, "updated_at": at, "deadline": at}  # fmt: skip
    before = {"req_1": ("inference", image(64, 64, 4), "succeeded"), "req_2": ("training", {"steps": 40}, "succeeded"),
              "req_3": ("inference", image(64, 64, 4), "failed")}  # fmt: skip
    try:
        with engine.begin() as conn:
            conn.execute(keys.insert().values(id=key_id, name="old", key_hash="0" * 64, webhook_secret="whsec_x",
                                              rate_limit_per_minute=60, created_at=at))  # fmt: skip
            for job_id, (kind, payload, status) in before.items():
                conn.execute(jobs.insert().values(**common, id=job_id, kind=kind, payload=payload))
                # The state machine's triggers allow a job to finish only from an attempt.
                for step in ("dispatched", status):
                    conn.execute(jobs.update().where(jobs.c.id == job_id).values(status=step, finished_at=at))
    finally:
        engine.dispose()
    upgrade(empty_url)
    store = Store(empty_url)
    try:
        report = store.key_usage(store.get_api_key(key_id), days=1, now=T0)
        mps = pytest.approx(64 * 64 / 1e6 * 4)
        assert report["days"] == [{"date": "2030-01-31", "images": 1, "megapixel_steps": mps, "training_steps": 40}]
        # The failed one counts for nothing, though it has its units.
        assert store.load_job("req_3").units_images == 1
    finally:
        store.close()


def test_each_process_counts_into_its_own_rows_and_reads_sum_them(store: Store):
    """Usage rows are per process (a shard each), so that replicas finishing jobs for one key
    never wait for each other's row lock: on PostgreSQL, a second process meters while the first
    one's transaction still holds its row. Whatever the rows, the key's usage is their sum."""
    key = store.create_api_key("client").key
    small, large, third = (submit(store, key.id, T0, payload=image(64, 64, n)) for n in (2, 4, 8))
    at = T0 + timedelta(minutes=5)
    with store.engine.connect() as first, store.engine.connect() as second:
        with first.begin():
            usage.record_success(first, small.id, at, shard=1)
            if store.dialect == "postgresql":
                with second.begin():
                    # Waiting for the first transaction's lock would fail here rather than hang.
                    second.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
                    usage.record_success(second, large.id, at, shard=2)
        if store.dialect != "postgresql":  # one writer at a time: after the first
            with second.begin():
                usage.record_success(second, large.id, at, shard=2)
        with first.begin():
            usage.record_success(first, third.id, at, shard=1)
        rows = first.execute(sa.text("SELECT shard, images FROM usage_days ORDER BY shard")).all()
    assert [tuple(row) for row in rows] == [(1, 2), (2, 1)]
    report = store.key_usage(store.get_api_key(key.id), days=1, now=at)
    mps = pytest.approx(64 * 64 / 1e6 * (2 + 4 + 8))
    assert report["days"] == [{"date": "2030-01-31", "images": 3, "megapixel_steps": mps, "training_steps": 0}]
    # A quota sees the sum too (and the three jobs still queued): room for exactly one more today.
    store.set_api_key_quota(key.id, Quota(day=Limits(images=7)))
    submit(store, key.id, at)
    with pytest.raises(QuotaExceeded, match=r"3 used today \(UTC\) and 4 held"):
        submit(store, key.id, at)


def test_every_process_counts_on_a_shard_of_its_own_forked_replicas_too():
    import subprocess
    import sys

    from dippy_studio.orchestrator.db import process_shard

    script = (
        "import os, sys\n"
        "from dippy_studio.orchestrator.db import process_shard\n"
        "print(process_shard(), flush=True)\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    print(process_shard(), flush=True)\n"
        "    os._exit(0)\n"
        "os.waitpid(child, 0)\n"
        "print(process_shard(), flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    parent, forked, parent_again = (int(line) for line in out.stdout.split())
    assert parent == parent_again  # a process keeps its shard
    assert len({process_shard(), parent, forked}) == 3


def test_a_quota_check_does_not_wait_for_rows_another_replica_added_for_the_key(pg_store: Store):
    """The quota check locks the key's row so that replicas take turns; a row another replica
    inserted for the key (its job, usage or rate window) holds a foreign-key lock on it, which the
    check must not wait for: two replicas' groups, each holding one, would deadlock."""
    store = pg_store
    key = store.create_api_key("client").key
    store.set_api_key_quota(key.id, Quota(day=Limits(images=10)))
    job = submit(store, key.id, T0)
    with store.engine.connect() as first, store.engine.connect() as second, second.begin():
        usage.record_success(second, job.id, T0, shard=5)  # a row referencing the key
        with first.begin():
            first.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
            assert usage.refusal(first, key.id, usage.Units(images=1), T0) is None


def test_counters_become_per_process_and_are_summed_back_on_the_way_down(empty_url: str):
    """Revision 0009: usage days (and rate windows, written the same way) get a shard per
    process; going back down sums each day's shards into one row."""
    from alembic import command

    from dippy_studio.orchestrator.db import alembic_config

    upgrade(empty_url, "0008")
    engine = make_engine(empty_url)
    days = sa.table("usage_days", sa.column("api_key_id"), sa.column("day", sa.Date),
                    *(sa.column(c) for c in ("images", "megapixel_steps", "training_steps")))  # fmt: skip
    day = T0.date()
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO api_keys (id, name, key_hash, webhook_secret, rate_limit_per_minute, created_at) "
                "VALUES ('k1', 'old', 'h', 's', 10, CURRENT_TIMESTAMP)"
            ))  # fmt: skip
            conn.execute(days.insert().values(api_key_id="k1", day=day, images=3, megapixel_steps=0.5,
                                              training_steps=7))  # fmt: skip
        upgrade(empty_url)
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT shard, images FROM usage_days")).all() == [(0, 3)]
            conn.execute(sa.text(
                "INSERT INTO usage_days (api_key_id, day, shard, images, megapixel_steps, training_steps) "
                "VALUES ('k1', :day, 99, 2, 0.25, 1)"
            ), {"day": day})  # fmt: skip
        command.downgrade(alembic_config(engine), "0008")
        with engine.connect() as conn:
            rows = conn.execute(sa.select(days)).all()
        assert [tuple(row) for row in rows] == [("k1", day, 5, 0.75, 8)]
    finally:
        engine.dispose()


# ---- two replicas, one PostgreSQL database ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_usage_and_quota_are_exact_across_two_replicas(tmp_path: Path, pg_databases: Callable[[], str]) -> None:
    """Requests sent at once to two replicas: the quota admits exactly as many as it allows (the
    rest 402), and both replicas report the same usage, equal to the jobs that ran."""
    from orchestrator.process_kit import FakeMiners, OrchestratorProcess, register, tail

    (tmp_path / "logs").mkdir()
    (tmp_path / "chain").mkdir()
    db_url = pg_databases()
    upgrade(db_url)
    admin = "admin-token-for-the-usage-test"
    env = {
        "DIPPY_ORCH_AUDIT": "false",
        "DIPPY_ORCH_PROBE_INTERVAL_S": "0.5",
        "DIPPY_ORCH_SYNC_INTERVAL_S": "1",
        "DIPPY_ORCH_ADMIN_TOKEN": admin,
    }
    uri = "//usage/orchestrator"
    replicas = [OrchestratorProcess(tmp_path, db_url, uri, env, name=f"replica-{n}") for n in "ab"]
    with contextlib.ExitStack() as cleanup:
        miners = FakeMiners("//usage/miner", 2, tmp_path / "logs" / "miners.log", uri)
        cleanup.callback(miners.stop)
        register(tmp_path / "chain", miners.listening())
        for replica in replicas:
            replica.start()
            cleanup.callback(replica.kill)
            cleanup.callback(lambda r=replica: print(tail(r.log, 30)))
        for replica in replicas:
            wait_until(lambda r=replica: r.healthy_miners() == 2, 60, f"{replica.log.stem} to see 2 miners")
        a, b = replicas
        operator = cleanup.enter_context(
            httpx.Client(base_url=a.url, headers={"Authorization": f"Bearer {admin}"}, timeout=30)
        )
        created = operator.post("/v1/admin/keys", json={"name": "builder", "quota": {"day": {"images": 5}}})
        assert created.status_code == 201, created.text
        key = created.json()
        headers = {"Authorization": f"Bearer {key['secret']}"}
        clients = [cleanup.enter_context(httpx.Client(base_url=r.url, headers=headers, timeout=60)) for r in replicas]

        def send(n: int) -> httpx.Response:
            body = {"prompt": f"request {n}", "seed": n, "width": 64, "height": 64 + 16 * (n % 2), "steps": 2}
            # No Prefer: wait: a result is inline only from the replica holding its blob (no shared bucket here).
            return clients[n % 2].post("/v1/images", json=body)

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(send, range(8)))
        admitted = [r for r in replies if r.status_code == 202]
        refused = [r for r in replies if r.status_code == 402]
        assert len(admitted) == 5 and len(refused) == 3, [r.status_code for r in replies]
        assert "daily quota of 5 images reached" in refused[0].json()["detail"]
        done = [wait_status(clients[0], r.json()["request_id"]) for r in admitted]
        expected_mps = sum(d["input"]["width"] * d["input"]["height"] / 1e6 * d["input"]["steps"] for d in done)

        today = [c.get("/v1/usage", params={"days": 1}) for c in clients]
        for reply in today:
            assert reply.status_code == 200, reply.text
            (day,) = reply.json()["days"]
            assert day["images"] == 5
            assert day["megapixel_steps"] == pytest.approx(expected_mps)
        assert today[0].json() == today[1].json()
        assert today[0].json()["quota"]["day"]["images"] == 5

        # Raised through the admin API of one replica, the other admits at once.
        raised = httpx.put(
            f"{b.url}/v1/admin/keys/{key['key']['id']}/quota",
            json={"day": {"images": 6}},
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert raised.status_code == 200, raised.text
        assert send(0).status_code == 202
        assert send(1).status_code == 402


def wait_status(client: httpx.Client, request_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        view = client.get(f"/v1/requests/{request_id}").json()
        return view if view["status"] == "succeeded" else None

    return wait_until(done, 30, f"{request_id} to succeed")
