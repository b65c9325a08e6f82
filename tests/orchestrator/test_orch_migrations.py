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
