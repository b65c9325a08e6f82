"""Leadership of the singleton loops: one replica at a time runs each of them.

Replicas on one database (several `orchestrator serve` processes, or `--workers N`) all handle
requests, dispatch and deliver webhooks. The sweeper, chain sync, probes, scoring and the audit
queue are singletons: each runs only on the replica that holds its role (`ROLES`). Before every
run a loop asks `Leadership.lead(role)`. A replica that holds the role checks that it still does
(fencing: a replica cut off from the database stops leading before its next run, not after);
one that does not tries to take it, without waiting, and the loop asks again every `retry_s`.

Backends, chosen by the store's database (`for_store`):
- PostgreSQL: session-level advisory locks, all held on one dedicated connection per replica.
  A replica that exits or is killed closes the socket, and the server frees its locks at once;
  one whose machine or network vanishes is dropped by the server's TCP keepalives within about
  two thirds of `takeover_s`, so the next try of another replica takes over within `takeover_s`.
- A SQLite file: an `fcntl.flock` per role on a file beside the database, so `--workers N` on
  one SQLite file also has one leader per loop. The kernel frees it when the process dies.
- In-memory SQLite: only this process can open it, so it leads everything.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import URL

from dippy_studio.orchestrator.db import error_reason

if TYPE_CHECKING:
    from dippy_studio.orchestrator.store import Store

log = logging.getLogger("dippy_studio.orchestrator.leader")

# The singleton loops. Dispatch, callbacks and webhooks are not here: every replica runs them.
ROLES = ("sweep", "sync", "probe", "scores", "audits")
APPLICATION_NAME = "dippy-orchestrator-leader"
_KEY_NAMESPACE = "dippy-studio/orchestrator/"


def role_key(role: str) -> int:
    """The advisory lock key for `role`: a signed 64-bit number derived from its name, the same
    on every replica and unlikely to meet another application's keys on a shared database."""
    digest = hashlib.sha256((_KEY_NAMESPACE + role).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Leadership:
    """This replica's hold on the singleton roles. The base class leads every role at once: for a
    database no other process can open."""

    def __init__(self, takeover_s: float) -> None:
        if takeover_s <= 0:
            raise ValueError("takeover_s must be positive")
        self.takeover_s = takeover_s
        # Followers try this often, so a freed role is taken well within `takeover_s`.
        self.retry_s = takeover_s / 4
        # Replaced, never changed in place, so `leads` reads it without waiting on `_guard`, which
        # a fencing check on a stalled connection may hold for seconds.
        self._held: frozenset[str] = frozenset()
        self._guard = threading.Lock()

    def lead(self, role: str) -> bool:
        """Whether this replica holds `role` now: checked live when it held it already, else tried
        once without waiting. Never raises: a database error means not leading."""
        with self._guard:
            try:
                if role in self._held:
                    if self._alive():
                        return True
                    self._lose_all("the connection holding the role is gone")
                    return False
                if not self._acquire(role):
                    return False
            except Exception:  # a lock file that cannot be opened, say: the loop must go on
                log.exception("cannot take or check the %s role", role)
                return False
            self._held |= {role}
            log.info("leading %s", role)
            return True

    def leads(self) -> list[str]:
        """The roles held, as last checked (no I/O: for /health)."""
        return sorted(self._held)

    def release(self, role: str) -> None:
        with self._guard:
            if role in self._held:
                self._held -= {role}
                self._release(role)
                log.info("no longer leading %s: released", role)

    def close(self) -> None:
        """Release every role (another replica takes them at its next try) and any connection."""
        with self._guard:
            for role in sorted(self._held):
                self._release(role)
                log.info("no longer leading %s: shutting down", role)
            self._held = frozenset()
            self._close()

    # ---- backends ---------------------------------------------------------------------------

    def _acquire(self, role: str) -> bool:
        return True

    def _alive(self) -> bool:
        return True

    def _release(self, role: str) -> None:
        pass

    def _close(self) -> None:
        pass

    def _lose_all(self, why: str) -> None:
        for role in sorted(self._held):
            log.info("no longer leading %s: %s", role, why)
        self._held = frozenset()


class FileLeadership(Leadership):
    """Roles as `fcntl.flock` locks on files beside a SQLite database (`<database>-leader-<role>`).
    flock belongs to the open file, so two orchestrators in one process exclude each other too."""

    def __init__(self, database: Path, takeover_s: float) -> None:
        super().__init__(takeover_s)
        self._database = database
        self._files: dict[str, int] = {}

    def path(self, role: str) -> Path:
        return self._database.with_name(f"{self._database.name}-leader-{role}")

    def _acquire(self, role: str) -> bool:
        fd = os.open(self.path(role), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._files[role] = fd
        return True

    # A held flock cannot be lost while its file stays open: `_alive` keeps the base's True.

    def _release(self, role: str) -> None:
        fd = self._files.pop(role, None)
        if fd is not None:
            os.close(fd)  # frees the lock


class PostgresLeadership(Leadership):
    """Roles as session-level advisory locks (`pg_try_advisory_lock`) on one connection of their
    own. The connection's liveness is the lease: session locks last exactly as long as it does, so
    a round trip on it proves every role is still held. (`pg_locks` would say so too, but reading
    it takes every lock-manager partition lock, which a busy server should not pay each loop run.)
    """

    def __init__(self, url: URL, takeover_s: float) -> None:
        super().__init__(takeover_s)
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._conn: Any = None
        self._unreachable = False

    def _connection(self) -> Any:
        if self._conn is None:
            import psycopg

            self._conn = psycopg.connect(
                self._conninfo, autocommit=True, application_name=APPLICATION_NAME, **client_keepalives(self.takeover_s)
            )
            # The server's side: it frees our locks when it finds this socket dead.
            settings = server_keepalives(self.takeover_s)
            names = ", ".join(f"set_config('{name}', %s, false)" for name in settings)
            self._conn.execute(f"SELECT {names}", [str(value) for value in settings.values()])
            if self._unreachable:
                log.info("leadership connection to the database restored")
            self._unreachable = False
        return self._conn

    def _query(self, sql: str, params: list[Any] | None = None) -> tuple[Any, ...] | None:
        """The first row of `sql` on the leadership connection; None when the connection fails
        (`_drop`: every role held on it is gone)."""
        import psycopg

        try:
            return self._connection().execute(sql, params).fetchone()
        except psycopg.Error as exc:
            self._drop(exc)
            return None

    def _acquire(self, role: str) -> bool:
        row = self._query("SELECT pg_try_advisory_lock(%s)", [role_key(role)])
        return bool(row and row[0])

    def _alive(self) -> bool:
        return self._query("SELECT 1") is not None

    def _release(self, role: str) -> None:
        if self._conn is not None:
            # On failure the lock went with the session.
            self._query("SELECT pg_advisory_unlock(%s)", [role_key(role)])

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _drop(self, exc: Exception) -> None:
        """The connection failed: every role held on it is gone. The next `lead` reconnects."""
        if not self._unreachable:
            log.warning("leadership connection failed: %s", error_reason(exc))
        self._unreachable = True
        if self._conn is not None:
            # Closing a broken connection may fail too; it is discarded anyway.
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        self._lose_all("lost the database connection")


def _dead_peer_s(takeover_s: float) -> float:
    """How long a silent peer may go before its connection counts as dead: two thirds of the
    takeover bound, leaving a follower's `retry_s` (a quarter) to take the freed role."""
    return takeover_s * 2 / 3


def server_keepalives(takeover_s: float) -> dict[str, int]:
    """PostgreSQL settings for our session's socket on the server (all settable by any user):
    probe an idle socket, then three probes, all within the budget, and give up on data left
    unacknowledged as long. Keepalives count whole seconds (4 at the least), so the bound holds
    for a vanished machine from a `takeover_s` of 6; a killed or stopped replica frees its roles
    at once whatever the setting."""
    budget = _dead_peer_s(takeover_s)
    count = 3
    interval = max(1, int(budget / 6))
    return {
        "tcp_keepalives_idle": max(1, int(budget - count * interval)),
        "tcp_keepalives_interval": interval,
        "tcp_keepalives_count": count,
        "tcp_user_timeout": max(1000, int(budget * 1000)),
    }


def client_keepalives(takeover_s: float) -> dict[str, int]:
    """libpq's options for our side of the same socket: a leader cut off from the server finds
    out (its fencing check fails) within the same budget, instead of the OS's minutes."""
    server = server_keepalives(takeover_s)
    return {
        "keepalives": 1,
        "keepalives_idle": server["tcp_keepalives_idle"],
        "keepalives_interval": server["tcp_keepalives_interval"],
        "keepalives_count": server["tcp_keepalives_count"],
        "tcp_user_timeout": server["tcp_user_timeout"],
        "connect_timeout": max(2, int(_dead_peer_s(takeover_s))),
    }


def for_store(store: Store, takeover_s: float) -> Leadership:
    """The leadership backend for the store's database."""
    url = store.engine.url
    if store.dialect == "postgresql":
        return PostgresLeadership(url, takeover_s)
    if url.database and url.database != ":memory:" and not url.database.startswith("file::memory:"):
        return FileLeadership(Path(url.database).resolve(), takeover_s)
    return Leadership(takeover_s)
