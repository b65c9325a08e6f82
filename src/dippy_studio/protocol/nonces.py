"""Replay protection: remember which (hotkey, nonce) pairs were already accepted.

Both stores implement `bittensor.http_auth.NonceStore` (`check_and_store`) for btauth/1
nonces, plus `claim` for string tokens such as Epistula UUIDs. They expose `retention`,
which `bittensor.http_auth.verify` compares with its freshness window: entries must
outlive `max_age + allowed_skew`, because anything older is rejected as stale before a
store is consulted and can be forgotten.

`SqliteNonceStore` is for servers with several worker processes on one host: every
process opens the same file and the primary key makes "first one wins" atomic. SQLite
locking needs a local filesystem; several hosts need a shared database instead.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from dippy_studio.sqlite_lock import WriteLock

__all__ = [
    "DEFAULT_RETENTION",
    "MemoryNonceStore",
    "NonceStore",
    "SqliteNonceStore",
    "retention_for",
]

# Covers bittensor's default window (10 s back + 2 s skew) with a wide margin.
DEFAULT_RETENTION = 60.0
# Past the freshness window, so a nonce is still remembered while a request signed at the
# window's very edge is being verified (the clock moves between the check and the claim).
RETENTION_MARGIN_S = 5.0


def retention_for(max_age: float, allowed_skew: float) -> float:
    """How long a store must remember nonces for a server accepting signatures up to `max_age`
    seconds old and `allowed_skew` seconds ahead (what `auth.check_nonce_window` requires, plus
    a margin): a forgotten nonce inside that window would let a replay through."""
    return max_age + allowed_skew + RETENTION_MARGIN_S


class NonceStore(Protocol):
    """A `bittensor.http_auth.NonceStore` that also claims arbitrary string tokens.

    Both methods return True (and remember the key) the first time a key is seen within
    `retention` seconds, False if it was already seen.
    """

    @property
    def retention(self) -> float: ...

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool: ...

    def claim(self, hotkey_ss58: str, token: str) -> bool: ...


def _btauth_token(nonce_ns: int) -> str:
    # Prefixed so a btauth nonce and an Epistula UUID can never collide in one table.
    return f"btauth:{int(nonce_ns)}"


class MemoryNonceStore:
    """A per-process store for tests and single-process servers."""

    def __init__(self, *, retention: float = DEFAULT_RETENTION, clock: Callable[[], float] = time.time):
        if retention <= 0:
            raise ValueError("retention must be positive")
        self.retention = retention
        self._clock = clock
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._last_purge = clock()

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool:
        return self.claim(hotkey_ss58, _btauth_token(nonce_ns))

    def claim(self, hotkey_ss58: str, token: str) -> bool:
        now = self._clock()
        key = (hotkey_ss58, token)
        with self._lock:
            if now - self._last_purge >= self.retention:
                self._purge_locked(now)
            seen_at = self._seen.get(key)
            if seen_at is not None and seen_at >= now - self.retention:
                return False
            self._seen[key] = now
            return True

    def purge(self) -> int:
        """Forget entries older than `retention`; returns how many were dropped."""
        with self._lock:
            return self._purge_locked(self._clock())

    def _purge_locked(self, now: float) -> int:
        cutoff = now - self.retention
        expired = [key for key, seen_at in self._seen.items() if seen_at < cutoff]
        for key in expired:
            del self._seen[key]
        self._last_purge = now
        return len(expired)

    def __len__(self) -> int:
        return len(self._seen)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen_nonces (
    hotkey  TEXT NOT NULL,
    token   TEXT NOT NULL,
    seen_at REAL NOT NULL,
    PRIMARY KEY (hotkey, token)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_nonces_seen_at ON seen_nonces (seen_at);
"""

# One statement, so it is atomic without an explicit transaction: a fresh key inserts,
# a key whose entry has expired (but was not purged yet) is taken over, and a key seen
# within the retention changes nothing. rowcount tells which happened.
_CLAIM = """
INSERT INTO seen_nonces (hotkey, token, seen_at) VALUES (?, ?, ?)
ON CONFLICT (hotkey, token) DO UPDATE SET seen_at = excluded.seen_at
WHERE seen_nonces.seen_at < ?
"""


class SqliteNonceStore:
    """A nonce store in one SQLite file, shared safely by several processes and threads.

    WAL mode lets readers and the single writer proceed together; `busy_timeout` makes a
    process wait for the write lock instead of failing when others are inserting.
    `synchronous=NORMAL` may lose the last few entries on power loss, which only reopens
    a window of seconds that the timestamp check still guards.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        retention: float = DEFAULT_RETENTION,
        busy_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ):
        if retention <= 0:
            raise ValueError("retention must be positive")
        self.path = Path(path)
        self.retention = retention
        self._busy_timeout = busy_timeout
        self._clock = clock
        # Connections are per thread (sqlite3 objects must not cross threads) and per
        # process (a connection inherited through fork must never be used).
        self._local = threading.local()
        self._pid = os.getpid()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        # Writers of every thread and process queue here rather than in SQLite's busy handler,
        # which sleeps in growing steps however soon the lock frees.
        self._write_lock = WriteLock.beside(self.path)
        self._last_purge = 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connect().executescript(_SCHEMA)

    def check_and_store(self, hotkey_ss58: str, nonce_ns: int) -> bool:
        return self.claim(hotkey_ss58, _btauth_token(nonce_ns))

    def claim(self, hotkey_ss58: str, token: str) -> bool:
        now = self._clock()
        connection = self._connect()
        if now - self._last_purge >= self.retention / 2:
            self._purge(connection, now)
        with self._write_lock.held(self._busy_timeout):
            cursor = connection.execute(_CLAIM, (hotkey_ss58, token, now, now - self.retention))
        return cursor.rowcount == 1

    def purge(self) -> int:
        """Delete entries older than `retention`; returns how many were deleted."""
        return self._purge(self._connect(), self._clock())

    def _purge(self, connection: sqlite3.Connection, now: float) -> int:
        # Per-process bookkeeping; several processes purging now and then is harmless.
        self._last_purge = now
        with self._write_lock.held(self._busy_timeout):
            cursor = connection.execute("DELETE FROM seen_nonces WHERE seen_at < ?", (now - self.retention,))
        return cursor.rowcount

    def _connect(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:
            # Forked child: forget the parent's connections without closing them, since
            # closing could disturb the parent's locks on the same file.
            self._pid = os.getpid()
            self._local = threading.local()
            self._connections = []
            self._connections_lock = threading.Lock()
            self._write_lock = WriteLock.beside(self.path)
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            # isolation_level=None: autocommit, so each claim is its own short transaction.
            connection = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
            connection.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")
            self._local.connection = connection
            with self._connections_lock:
                self._connections.append(connection)
        return connection

    def close(self) -> None:
        """Close every connection this process opened (call when no thread uses the store)."""
        with self._connections_lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> SqliteNonceStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
