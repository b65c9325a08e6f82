"""The database itself enforces the job state machine (migration 0003), on SQLite and PostgreSQL:
raw SQL from any writer cannot revive a finished job or skip a step, and the store can tell the
database's refusal from any other error."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic import command
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import IntegrityError

from dippy_studio.orchestrator.db import alembic_config, make_engine, upgrade
from dippy_studio.orchestrator.states import TRANSITIONS, RequestStatus, is_illegal_transition

STATUSES = [s.value for s in RequestStatus]
# Legal steps from a new (queued) job to each status.
PATH = {
    "queued": [],
    "dispatched": ["dispatched"],
    "running": ["dispatched", "running"],
    "succeeded": ["dispatched", "running", "succeeded"],
    "failed": ["failed"],
    "canceled": ["canceled"],
}
T0 = "2026-01-01 00:00:00"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO api_keys (id, name, key_hash, webhook_secret, rate_limit_per_minute, created_at) "
                "VALUES ('k', 'test', 'hash', 'whsec_test', 60, :t0)"
            ),
            {"t0": T0},
        )
    yield engine
    engine.dispose()


def insert_job(engine: Engine, job_id: str, status: str = "queued") -> None:
    # Jobs name their model from revision 0006 on; the tests start from older ones too.
    has_model = "model" in {column["name"] for column in inspect(engine).get_columns("jobs")}
    column, value = ("model, ", "'tiny', ") if has_model else ("", "")
    with engine.begin() as conn:
        conn.execute(
            text(
                f"INSERT INTO jobs (id, api_key_id, kind, {column}status, payload, created_at, updated_at, deadline,"
                " attempts, max_attempts, attempt_timeout_s, timings, webhook_state, webhook_attempts, audit)"
                f" VALUES (:id, 'k', 'inference', {value}:status, '{{}}', :t0, :t0, :t0, 0, 3, 60, '{{}}', 'none', 0,"
                " FALSE)"
            ),
            {"id": job_id, "status": status, "t0": T0},
        )


def set_status(engine: Engine, job_id: str, status: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET status = :status WHERE id = :id"), {"id": job_id, "status": status})


def status_of(engine: Engine, job_id: str) -> str:
    with engine.connect() as conn:
        return conn.execute(text("SELECT status FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()


def job_in(engine: Engine, job_id: str, status: str) -> str:
    insert_job(engine, job_id)
    for step in PATH[status]:
        set_status(engine, job_id, step)
    assert status_of(engine, job_id) == status
    return job_id


def test_the_database_holds_the_state_machine(engine: Engine):
    with engine.connect() as conn:
        rows = set(conn.execute(text("SELECT from_status, to_status FROM job_transitions")).tuples())
    assert rows == {(frm.value, to.value) for frm, to in TRANSITIONS}


def test_the_database_accepts_exactly_the_state_machine(engine: Engine):
    accepted, refusals = set(), {}
    for frm in STATUSES:
        for to in STATUSES:
            job_id = job_in(engine, f"req_{frm}_{to}", frm)
            try:
                set_status(engine, job_id, to)
                accepted.add((frm, to))
            except IntegrityError as exc:
                refusals[(frm, to)] = exc
                assert status_of(engine, job_id) == frm
    # Every pair the state machine allows, and a status that stays as it is.
    assert accepted == {(frm.value, to.value) for frm, to in TRANSITIONS} | {(s, s) for s in STATUSES}
    for (frm, to), exc in refusals.items():
        assert is_illegal_transition(exc), exc
        assert f"illegal job transition: {frm} -> {to}" in str(exc)


@pytest.mark.parametrize(("frm", "to"), [("succeeded", "queued"), ("queued", "succeeded"), ("canceled", "running")])
def test_raw_sql_cannot_revive_a_finished_job_or_skip_a_step(engine: Engine, frm: str, to: str):
    job_id = job_in(engine, "req_1", frm)
    with pytest.raises(IntegrityError, match=f"illegal job transition: {frm} -> {to}") as raised:
        set_status(engine, job_id, to)
    assert is_illegal_transition(raised.value)
    assert status_of(engine, job_id) == frm


def test_other_columns_change_freely_while_the_status_stays(engine: Engine):
    job_id = job_in(engine, "req_1", "succeeded")
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET error = 'late note' WHERE id = :id"), {"id": job_id})
        conn.execute(text("UPDATE jobs SET status = status, webhook_state = 'pending' WHERE id = :id"), {"id": job_id})
        conn.execute(text("UPDATE jobs SET status = 'succeeded', attempts = 2 WHERE id = :id"), {"id": job_id})
    with engine.connect() as conn:
        row = conn.execute(text("SELECT status, error, webhook_state, attempts FROM jobs")).one()
    assert tuple(row) == ("succeeded", "late note", "pending", 2)


@pytest.mark.parametrize("status", [s for s in STATUSES if s != "queued"])
def test_a_new_job_must_be_queued(engine: Engine, status: str):
    with pytest.raises(IntegrityError, match=f"illegal job transition: a new job must be queued, not {status}") as e:
        insert_job(engine, "req_1", status)
    assert is_illegal_transition(e.value)
    insert_job(engine, "req_1")
    assert status_of(engine, "req_1") == "queued"


def test_other_integrity_errors_are_not_illegal_transitions(engine: Engine):
    insert_job(engine, "req_1")
    with pytest.raises(IntegrityError) as raised:
        insert_job(engine, "req_1")  # the primary key
    assert not is_illegal_transition(raised.value)
    assert not is_illegal_transition(ValueError("illegal"))


# ---- the migration ----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'orchestrator.sqlite'}"
    return request.getfixturevalue("pg_databases")()


def test_upgrading_a_database_with_jobs_enforces_and_downgrading_stops(empty_url: str):
    upgrade(empty_url, "0002")
    engine = make_engine(empty_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO api_keys (id, name, key_hash, webhook_secret, rate_limit_per_minute, created_at) "
                    "VALUES ('k', 'test', 'hash', 'whsec_test', 60, :t0)"
                ),
                {"t0": T0},
            )
        # Before 0003 nothing stops a job from being written in any state.
        insert_job(engine, "req_done", "succeeded")
        insert_job(engine, "req_busy", "running")

        upgrade(engine, "0003")
        with pytest.raises(IntegrityError, match="illegal job transition: succeeded -> queued"):
            set_status(engine, "req_done", "queued")
        with pytest.raises(IntegrityError, match="a new job must be queued"):
            insert_job(engine, "req_new", "running")
        set_status(engine, "req_busy", "succeeded")
        assert status_of(engine, "req_busy") == "succeeded"

        command.downgrade(alembic_config(engine), "0002")
        assert "job_transitions" not in inspect(engine).get_table_names()
        set_status(engine, "req_done", "queued")
        insert_job(engine, "req_new", "running")
        assert (status_of(engine, "req_done"), status_of(engine, "req_new")) == ("queued", "running")

        upgrade(engine)  # and back up: enforced again
        with pytest.raises(IntegrityError, match="illegal job transition: queued -> succeeded"):
            set_status(engine, "req_done", "succeeded")
    finally:
        engine.dispose()
