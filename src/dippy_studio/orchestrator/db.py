"""Engines and migrations. SQLite (a file under the data dir) by default, PostgreSQL by URL.

SQLite runs in WAL mode with foreign keys on and a busy timeout, and writes start with
`BEGIN IMMEDIATE`: a deferred transaction that reads and then writes can fail at once with
SQLITE_BUSY when another process committed in between (the busy timeout does not cover that),
while an immediate one waits its turn for the write lock.

Writers to a SQLite file also queue on a `WriteLock` before `BEGIN IMMEDIATE`, held until their
commit or rollback: threads of one process on a `threading.Lock`, processes (`serve --workers`,
replicas) on a file lock beside the database. SQLite's busy handler polls, sleeping in growing
steps (up to 100 ms) however soon the lock frees, so writers arriving at once slept past each
other (bench/bench_throughput.py measured the difference).

Counters every request or success adds to (a key's rate window, its usage for the day) have one
row per process (`process_shard`), and reads sum them. With one row per counter, each replica's
write transaction held it locked until its commit, and replicas serving one busy key took turns
at that lock.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, NoSuchModuleError

from dippy_studio.sqlite_lock import WriteLock

if TYPE_CHECKING:
    from alembic.config import Config

DB_FILENAME = "orchestrator.sqlite"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Fail a connection attempt to an unreachable PostgreSQL in seconds, not the OS's minutes.
PG_CONNECT_TIMEOUT_S = 10
# A pooled PostgreSQL connection idle this long is pinged before use (`_ping_when_idle`).
PG_IDLE_PING_S = 10.0
# The newest migration in migrations/versions (a test keeps the two equal).
HEAD_REVISION = "0010"
# Execution option a connection carries when its transaction will write (see module docstring).
WRITE_OPTION = "dippy_write"


# Drawn from a space large enough that replicas practically never share a shard; sharing one would
# only make them take turns at its rows again, never count wrong.
_SHARDS = 2**31
_shard = secrets.randbelow(_SHARDS)


def process_shard() -> int:
    """This process's rows of the shared counters (module docstring)."""
    return _shard


def _draw_shard() -> None:
    global _shard
    _shard = secrets.randbelow(_SHARDS)


# A forked replica is another process: it must not write into its parent's rows.
os.register_at_fork(after_in_child=_draw_shard)


class DatabaseUrlError(ValueError):
    """The database URL cannot be used (bad syntax, unknown backend, missing driver)."""


def error_reason(exc: BaseException) -> str:
    """A database error in one line: the driver's first line (host unreachable, auth failed, ...),
    unwrapped from SQLAlchemy's, or the error's type when it says nothing."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def default_url(data_dir: Path | str) -> str:
    return f"sqlite:///{Path(data_dir) / DB_FILENAME}"


def safe_url(url: str | URL) -> str:
    """The URL with any password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def parse_url(url: str | URL) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseUrlError(f"not a database URL: {url!r}") from exc
    # psycopg 3 is the driver we ship; `postgresql://` would otherwise ask for psycopg2.
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise DatabaseUrlError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite:/// or postgresql://")
    return parsed


def make_engine(url: str | URL) -> Engine:
    parsed = parse_url(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite:
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        connect_args: dict[str, Any] = {"factory": _WriteLockedConnection}
    else:
        connect_args = {} if "connect_timeout" in parsed.query else {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    try:
        engine = create_engine(parsed, connect_args=connect_args)
    except NoSuchModuleError as exc:
        raise DatabaseUrlError(f"no driver for {parsed.drivername!r}") from exc
    if is_sqlite:
        _write_locked_sqlite(engine, _write_lock_for(parsed.database))
    else:
        _ping_when_idle(engine, PG_IDLE_PING_S)
    return engine


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Check a pooled connection before use when it sat idle for `idle_s`: a replica idle behind
    a proxy, or across a server restart, should not fail its next request. SQLAlchemy's
    `pool_pre_ping` pings on every checkout, a round trip per query on a busy server; a
    connection used moments ago is not checked, and if the server went away meanwhile, the
    first error invalidates the whole pool."""

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_connection, record) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection, record, _proxy) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < idle_s:
            return
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            dbapi_connection.rollback()  # end the transaction the driver opened for the ping
        except Exception as exc:
            # The pool discards this connection and checks out (or opens) another.
            raise DisconnectionError(f"idle connection is gone: {type(exc).__name__}") from exc


class _WriteLockedConnection(sqlite3.Connection):
    """A sqlite3 connection that gives back the process's write lock for its file (taken in
    `_begin`) once its transaction has ended: after the COMMIT, not before, so the next writer's
    BEGIN IMMEDIATE never finds the database still locked."""

    write_lock: WriteLock | None = None
    holds_write_lock = False

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._release()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._release()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._release()

    def _release(self) -> None:
        if self.holds_write_lock and self.write_lock is not None:
            self.holds_write_lock = False
            self.write_lock.release()


_write_locks: dict[Path, WriteLock] = {}
_write_locks_guard = threading.Lock()


def _write_lock_for(database: str | None) -> WriteLock:
    """One lock per database file in this process, shared by every engine on it."""
    if not database or database == ":memory:":
        return WriteLock(None)  # private to its engine
    path = Path(database).resolve()
    with _write_locks_guard:
        if path not in _write_locks:
            _write_locks[path] = WriteLock.beside(path)
        return _write_locks[path]


def _write_locked_sqlite(engine: Engine, write_lock: WriteLock) -> None:
    """Set up each new SQLite connection (module docstring) and start its write transactions on
    `write_lock`."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        # Take transaction control away from the sqlite3 module so `_begin` decides how each starts.
        dbapi_connection.isolation_level = None
        dbapi_connection.write_lock = write_lock
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # Safe with WAL (a power cut may lose the last commits, never corrupt) and much faster.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        if not conn.get_execution_options().get(WRITE_OPTION):
            conn.exec_driver_sql("BEGIN")
            return
        dbapi_connection = conn.connection.dbapi_connection
        # Bounded like the busy timeout: a thread that nests two writes fails as it would without
        # the lock (SQLITE_BUSY after the timeout) instead of waiting on itself forever.
        if write_lock.acquire(SQLITE_BUSY_TIMEOUT_MS / 1000):
            dbapi_connection.holds_write_lock = True
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            dbapi_connection._release()
            raise


def alembic_config(engine: Engine, default_model: str | None = None) -> Config:
    """Alembic configured in code: the scripts ship inside the package, no alembic.ini needed.
    `default_model` is the orchestrator's default model, for rows a migration must label with one
    (revision 0006)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes["engine"] = engine
    config.attributes["default_model"] = default_model
    return config


def upgrade(url_or_engine: str | URL | Engine, revision: str = "head", *, default_model: str | None = None) -> None:
    """Bring the schema up to `revision`. Safe to run on every start, from several processes.
    A database already at `HEAD_REVISION` is left alone without loading Alembic, which would
    cost each replica more than half a second of its start."""
    engine = url_or_engine if isinstance(url_or_engine, Engine) else make_engine(url_or_engine)
    try:
        if revision == "head" and current_revision(engine) == HEAD_REVISION:
            return
        from alembic import command

        command.upgrade(alembic_config(engine, default_model), revision)
    finally:
        if engine is not url_or_engine:
            engine.dispose()


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at (None: none yet)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
