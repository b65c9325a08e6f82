"""Migrations build the schema the models describe, on an empty database, idempotently."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from dippy_studio.orchestrator.db import (
    HEAD_REVISION,
    DatabaseUrlError,
    alembic_config,
    current_revision,
    make_engine,
    upgrade,
)
from dippy_studio.orchestrator.models import Base


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nested' / 'orchestrator.sqlite'}"
    return request.getfixturevalue("pg_databases")()


def _head(engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_upgrade_creates_the_schema_the_models_describe(empty_url: str):
    upgrade(empty_url)
    engine = make_engine(empty_url)
    try:
        assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == []
        head = _head(engine)
        # The revision a start compares against before loading Alembic is the scripts' newest.
        scripts = ScriptDirectory.from_config(alembic_config(engine))
        assert head == scripts.get_current_head() == HEAD_REVISION == current_revision(engine)
        upgrade(empty_url)  # idempotent: a second start finds nothing to do
        assert _head(engine) == head
        assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    finally:
        engine.dispose()


def test_sqlite_connections_use_wal_foreign_keys_and_a_busy_timeout(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'o.sqlite'}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    finally:
        engine.dispose()


@pytest.mark.parametrize("url", ["not a url", "mysql://db/x", "oracle+nothing://x"])
def test_unusable_urls_are_refused_clearly(url: str):
    with pytest.raises(DatabaseUrlError):
        make_engine(url)


def test_upgrading_keeps_the_first_of_two_verdicts_for_one_job(empty_url: str):
    """Revision 0007 makes a verdict per job unique; a database that stored two keeps the first."""
    import sqlalchemy as sa

    upgrade(empty_url, "0006")
    engine = make_engine(empty_url)
    try:
        with engine.begin() as conn:
            _old_flagged_job(conn, "req_1", verdicts=("fail", "pass"))
        upgrade(empty_url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT verdict FROM audits")).scalars().all() == ["fail"]
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO audits (job_id, miner_hotkey, verdict, evidence, created_at) "
                    "VALUES ('req_1', 'hk', 'pass', '{}', CURRENT_TIMESTAMP)"
                )
            )
    finally:
        engine.dispose()


def test_upgrading_owes_the_audits_picked_but_not_judged(empty_url: str):
    """Revision 0008: jobs picked for an audit before it, without a verdict, are owed after it."""
    import sqlalchemy as sa

    upgrade(empty_url, "0007")
    engine = make_engine(empty_url)
    try:
        with engine.begin() as conn:
            _old_flagged_job(conn, "req_judged", verdicts=("pass",))
            _old_flagged_job(conn, "req_owed", verdicts=())
            _old_flagged_job(conn, "req_never_picked", verdicts=(), audit=False)
        upgrade(empty_url)
        with engine.connect() as conn:
            owed = conn.execute(sa.text("SELECT id, audit, audit_owed FROM jobs ORDER BY id")).all()
        assert [tuple(row) for row in owed] == [
            ("req_judged", True, False),
            ("req_never_picked", False, False),
            ("req_owed", True, True),
        ]
    finally:
        engine.dispose()


def _old_flagged_job(conn, job_id: str, verdicts: tuple[str, ...], audit: bool = True) -> None:
    """A job as revisions 0006-0007 stored it (its key made on first use), with these verdicts."""
    import sqlalchemy as sa

    conn.execute(
        sa.text(
            "INSERT INTO api_keys (id, name, key_hash, webhook_secret, rate_limit_per_minute, created_at) "
            "SELECT 'k1', 'old', 'h', 's', 10, CURRENT_TIMESTAMP WHERE NOT EXISTS (SELECT 1 FROM api_keys)"
        )
    )
    conn.execute(
        sa.text(
            "INSERT INTO jobs (id, api_key_id, kind, model, status, payload, created_at, updated_at, deadline, "
            "attempts, max_attempts, attempt_timeout_s, timings, webhook_state, webhook_attempts, audit) "
            "VALUES (:id, 'k1', 'inference', 'tiny', 'queued', '{}', CURRENT_TIMESTAMP, "
            "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 0, 3, 60, '{}', 'none', 0, :audit)"
        ),
        {"id": job_id, "audit": audit},
    )
    for verdict in verdicts:
        conn.execute(
            sa.text(
                "INSERT INTO audits (job_id, miner_hotkey, verdict, evidence, created_at) "
                "VALUES (:id, 'hk', :verdict, '{}', CURRENT_TIMESTAMP)"
            ),
            {"id": job_id, "verdict": verdict},
        )


def test_downgrading_the_later_revisions_keeps_the_job_state_machine(empty_url: str):
    """0005, 0006 and 0008 drop columns of `jobs` on the way down. A table rebuild would drop the
    state machine's triggers (revision 0003) with it on SQLite, so an illegal status would then
    pass unnoticed."""
    import sqlalchemy as sa
    from alembic import command

    upgrade(empty_url)
    engine = make_engine(empty_url)
    try:
        command.downgrade(alembic_config(engine), "0003")
        columns = {column["name"] for column in inspect(engine).get_columns("jobs")}
        assert not {"model", "audit_owed", "units_images"} & columns
        with pytest.raises(sa.exc.IntegrityError, match="a new job must be queued"), engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO api_keys (id, name, key_hash, webhook_secret, rate_limit_per_minute, created_at) "
                    "VALUES ('k1', 'old', 'h', 's', 10, CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                sa.text(
                    "INSERT INTO jobs (id, api_key_id, kind, status, payload, created_at, updated_at, deadline, "
                    "attempts, max_attempts, attempt_timeout_s, timings, webhook_state, webhook_attempts, audit) "
                    "VALUES ('req_1', 'k1', 'inference', 'succeeded', '{}', CURRENT_TIMESTAMP, "
                    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 0, 3, 60, '{}', 'none', 0, false)"
                )
            )
        upgrade(empty_url)  # and back up
        assert current_revision(engine) == HEAD_REVISION
    finally:
        engine.dispose()
