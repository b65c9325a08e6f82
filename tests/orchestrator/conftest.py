"""Store fixtures, parametrized over SQLite (a file per test) and PostgreSQL.

PostgreSQL: one fresh database per test session (`dippy_test_<random>`, dropped at the end), so
parallel runs on one server do not collide; tables are emptied between tests. The server is
found at DIPPY_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432/postgres); without
one, the PostgreSQL cases skip and say why.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from dippy_studio.orchestrator.db import upgrade
from dippy_studio.orchestrator.models import Base, JobTransition
from dippy_studio.orchestrator.store import Store
from orchestrator.s3_kit import CREDENTIALS, S3Server, s3_server

PG_UNREACHABLE = "PostgreSQL not reachable at 127.0.0.1:5432"
_ADMIN_CANDIDATES = [
    "postgresql://postgres@127.0.0.1:5432/postgres",
    "postgresql://postgres@127.0.0.1:5432/test",
    "postgresql://root@127.0.0.1:5432/test",
]


def _admin_connect():
    """An autocommit connection allowed to CREATE DATABASE and its URL, or (None, why not)."""
    import psycopg

    override = os.environ.get("DIPPY_TEST_POSTGRES")
    reason = f"PostgreSQL not reachable at {make_url(override).render_as_string()}" if override else PG_UNREACHABLE
    for url in [override] if override else _ADMIN_CANDIDATES:
        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=3)
        except psycopg.OperationalError:
            continue
        can_create = conn.execute(
            "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        if can_create and can_create[0]:
            return conn, url
        conn.close()
        reason = f"PostgreSQL user at {make_url(url).render_as_string()} may not CREATE DATABASE"
    return None, reason


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[Callable[[], str]]:
    """Makes fresh, empty PostgreSQL databases (SQLAlchemy URLs); drops them all at session end."""
    conn, admin_url_or_reason = _admin_connect()
    if conn is None:
        pytest.skip(admin_url_or_reason)
    admin_url = admin_url_or_reason
    made: list[str] = []

    def make() -> str:
        name = f"dippy_test_{secrets.token_hex(6)}"
        conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return make_url(admin_url).set(drivername="postgresql+psycopg", database=name).render_as_string(False)

    try:
        yield make
    finally:
        for name in made:
            # FORCE: a test that failed half-way may have left a connection open.
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture(scope="session")
def pg_session_url(pg_databases: Callable[[], str]) -> str:
    url = pg_databases()
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A migrated, empty database: a new SQLite file, or the session's PostgreSQL database emptied."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'orchestrator.sqlite'}"
        upgrade(url)
        yield url
        return
    url = request.getfixturevalue("pg_session_url")
    store = Store(url)
    # `job_transitions` is reference data the migrations wrote, not test state.
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables if t.name != JobTransition.__tablename__)
    with store.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    store.close()
    yield url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    store = Store(db_url)
    yield store
    store.close()


@pytest.fixture
def pg_store(pg_databases: Callable[[], str]) -> Iterator[Store]:
    """A store on a fresh PostgreSQL database, for what only PostgreSQL does (plans, row locks)."""
    store = Store.open(pg_databases())
    yield store
    store.close()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """moto's S3 server on a loopback port for the session, with credentials in the environment
    (boto3's default chain, as the orchestrator reads them)."""
    with pytest.MonkeyPatch.context() as env, s3_server() as server:
        for name, value in CREDENTIALS.items():
            env.setenv(name, value)
        yield server


@pytest.fixture
def s3_bucket(s3: S3Server) -> str:
    """A fresh, empty bucket on the session's S3 server."""
    return s3.new_bucket()
