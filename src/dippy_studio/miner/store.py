"""The miner's job records in SQLite: they survive restarts, and every transition is a
compare-and-set so a job cannot be finished twice or resurrected after cancelation."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dippy_studio.protocol.schemas import JobKind, JobStatus, JobView

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    sender TEXT NOT NULL,
    request TEXT NOT NULL,
    callback_url TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    deadline REAL NOT NULL,
    error TEXT,
    input_error INTEGER NOT NULL DEFAULT 0,
    result_path TEXT,
    result_sha256 TEXT,
    result_bytes INTEGER,
    fingerprint TEXT,
    timings TEXT NOT NULL DEFAULT '{}',
    metrics TEXT NOT NULL DEFAULT '{}',
    callback_state TEXT NOT NULL DEFAULT 'none',
    callback_attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (kind, status, created_at);
"""
# Columns added after the first release, added to an older database when it is opened.
ADDED_COLUMNS = {"input_error": "INTEGER NOT NULL DEFAULT 0"}


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    kind: JobKind
    status: JobStatus
    sender: str
    request: dict[str, Any]
    callback_url: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    deadline: float
    error: str | None
    result_path: str | None
    result_sha256: str | None
    result_bytes: int | None
    fingerprint: str | None
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    callback_state: str = "none"
    callback_attempts: int = 0
    input_error: bool = False

    def view(self) -> JobView:
        return JobView(
            job_id=self.job_id,
            kind=self.kind,
            status=self.status,
            created_at=_dt(self.created_at),
            started_at=_dt(self.started_at),
            finished_at=_dt(self.finished_at),
            deadline=_dt(self.deadline),
            error=self.error,
            input_error=self.input_error,
            result_sha256=self.result_sha256,
            result_bytes=self.result_bytes,
            fingerprint=self.fingerprint,
            timings=self.timings,
            metrics=self.metrics,
        )


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=UTC)


class JobStore:
    """Thread-safe access to the jobs table (one connection per thread, WAL mode)."""

    def __init__(self, path: Path, clock=time.time) -> None:
        self.path = path
        self.clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._db().executescript(SCHEMA)  # executescript manages its own transaction
        have = {row["name"] for row in self._db().execute("PRAGMA table_info(jobs)")}
        for name, declaration in ADDED_COLUMNS.items():
            if name not in have:
                self._db().execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb) -> None:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self) -> _Tx:
        return JobStore._Tx(self._db())

    # --- creation and reads ---------------------------------------------------------------

    def create(
        self,
        *,
        job_id: str,
        kind: JobKind,
        sender: str,
        request: dict[str, Any],
        callback_url: str | None,
        deadline: float,
        queue_limit: int,
        max_ahead: int | None = None,
    ) -> tuple[JobRecord, bool] | None:
        """Insert a queued job. Returns (record, created); (existing, False) when the id is
        taken; None when the lane's queue is full, or when more than `max_ahead` jobs of the lane
        are queued or running (then this one could not finish in time)."""
        with self._tx() as db:
            existing = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if existing is not None:
                return _record(existing), False
            counts = dict(
                db.execute(
                    "SELECT status, COUNT(*) FROM jobs WHERE kind = ? AND status IN ('queued', 'running') "
                    "GROUP BY status",
                    (kind.value,),
                ).fetchall()
            )
            depth = counts.get("queued", 0)
            if depth >= queue_limit or (max_ahead is not None and depth + counts.get("running", 0) > max_ahead):
                return None
            db.execute(
                "INSERT INTO jobs (job_id, kind, status, sender, request, callback_url, created_at, deadline) "
                "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, kind.value, sender, json.dumps(request), callback_url, self.clock(), deadline),
            )
            row = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _record(row), True

    def get(self, job_id: str) -> JobRecord | None:
        row = self._db().execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else _record(row)

    def depth(self, kind: JobKind) -> int:
        return (
            self._db()
            .execute("SELECT COUNT(*) FROM jobs WHERE kind = ? AND status = 'queued'", (kind.value,))
            .fetchone()[0]
        )

    def recent_run_seconds(self, kind: JobKind, limit: int = 20) -> list[float]:
        """How long the lane's latest succeeded jobs held a worker, oldest first."""
        rows = (
            self._db()
            .execute(
                "SELECT finished_at - started_at FROM jobs WHERE kind = ? AND status = 'succeeded' "
                "AND started_at IS NOT NULL ORDER BY finished_at DESC LIMIT ?",
                (kind.value, limit),
            )
            .fetchall()
        )
        return [max(0.0, float(seconds)) for (seconds,) in reversed(rows)]

    def counts(self) -> dict[tuple[str, str], int]:
        rows = self._db().execute("SELECT kind, status, COUNT(*) FROM jobs GROUP BY kind, status").fetchall()
        return {(kind, status): n for kind, status, n in rows}

    # --- transitions (compare-and-set) ----------------------------------------------------

    def claim(self, kind: JobKind) -> tuple[JobRecord | None, list[JobRecord]]:
        """Take the oldest queued job of `kind` into running. Queued jobs whose deadline has
        passed are expired on the way (returned second, so their senders can be told)."""
        expired: list[JobRecord] = []
        now = self.clock()
        with self._tx() as db:
            while True:
                row = db.execute(
                    "SELECT * FROM jobs WHERE kind = ? AND status = 'queued' ORDER BY created_at, job_id LIMIT 1",
                    (kind.value,),
                ).fetchone()
                if row is None:
                    return None, expired
                if row["deadline"] <= now:
                    db.execute(
                        "UPDATE jobs SET status = 'expired', finished_at = ?, error = ? WHERE job_id = ?",
                        (now, "deadline passed before the job could start", row["job_id"]),
                    )
                    expired.append(self._get_in(db, row["job_id"]))
                    continue
                db.execute(
                    "UPDATE jobs SET status = 'running', started_at = ? WHERE job_id = ?",
                    (now, row["job_id"]),
                )
                return self._get_in(db, row["job_id"]), expired

    def succeed(
        self,
        job_id: str,
        *,
        result_path: str,
        result_sha256: str,
        result_bytes: int,
        fingerprint: str | None,
        timings: dict[str, float],
        metrics: dict[str, Any],
    ) -> JobRecord | None:
        return self._transition(
            job_id,
            frm=(JobStatus.running,),
            to=JobStatus.succeeded,
            result_path=result_path,
            result_sha256=result_sha256,
            result_bytes=result_bytes,
            fingerprint=fingerprint,
            timings=json.dumps(timings),
            metrics=json.dumps(metrics),
        )

    def end(self, job_id: str, status: JobStatus, error: str, *, input_error: bool = False) -> JobRecord | None:
        """Move a queued or running job to failed / expired / canceled; `input_error` says the
        job's input, not this miner, is why it failed."""
        return self._transition(
            job_id,
            frm=(JobStatus.queued, JobStatus.running),
            to=status,
            error=error[:2000],
            input_error=int(input_error),
        )

    def cancel_queued(self, job_id: str, error: str) -> JobRecord | None:
        """Cancel a job that no worker has taken yet; None once one has (then only the worker
        running it can stop it)."""
        return self._transition(job_id, frm=(JobStatus.queued,), to=JobStatus.canceled, error=error)

    def recover(self) -> list[JobRecord]:
        """After a restart: jobs that were running are queued again (work is deterministic,
        so re-running gives the same result) unless their deadline passed (then expired)."""
        now = self.clock()
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status = 'expired', finished_at = ?, "
                "error = 'deadline passed while the miner was down' "
                "WHERE status IN ('queued', 'running') AND deadline <= ?",
                (now, now),
            )
            db.execute("UPDATE jobs SET status = 'queued', started_at = NULL WHERE status = 'running'")
            rows = db.execute("SELECT * FROM jobs WHERE callback_state = 'pending'").fetchall()
        return [_record(r) for r in rows]

    def set_callback_state(self, job_id: str, state: str, attempts: int) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET callback_state = ?, callback_attempts = ? WHERE job_id = ?",
                (state, attempts, job_id),
            )

    def _transition(self, job_id: str, *, frm: tuple[JobStatus, ...], to: JobStatus, **fields: Any):
        sets = ", ".join(f"{name} = ?" for name in fields)
        placeholders = ", ".join("?" for _ in frm)
        callback = ", callback_state = CASE WHEN callback_url IS NULL THEN 'none' ELSE 'pending' END"
        with self._tx() as db:
            cursor = db.execute(
                f"UPDATE jobs SET status = ?, finished_at = ?{', ' + sets if sets else ''}{callback} "
                f"WHERE job_id = ? AND status IN ({placeholders})",
                (to.value, self.clock(), *fields.values(), job_id, *(s.value for s in frm)),
            )
            if cursor.rowcount == 0:
                return None
            return self._get_in(db, job_id)

    @staticmethod
    def _get_in(db: sqlite3.Connection, job_id: str) -> JobRecord:
        return _record(db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone())


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        job_id=row["job_id"],
        kind=JobKind(row["kind"]),
        status=JobStatus(row["status"]),
        sender=row["sender"],
        request=json.loads(row["request"]),
        callback_url=row["callback_url"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        deadline=row["deadline"],
        error=row["error"],
        result_path=row["result_path"],
        result_sha256=row["result_sha256"],
        result_bytes=row["result_bytes"],
        fingerprint=row["fingerprint"],
        timings=json.loads(row["timings"]),
        metrics=json.loads(row["metrics"]),
        callback_state=row["callback_state"],
        callback_attempts=row["callback_attempts"],
        input_error=bool(row["input_error"]),
    )
