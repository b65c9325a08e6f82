"""Every query the orchestrator makes, in one place.

SQLite and PostgreSQL differ only here, and only in how a write is made safe under concurrency:
PostgreSQL locks the rows it takes with `SELECT ... FOR UPDATE SKIP LOCKED`, so several
orchestrator processes can claim from one queue without waiting on or double-taking each other;
SQLite has no row locks, so writes run in `BEGIN IMMEDIATE` transactions (see `db`), which take
the database's single write lock up front (and the `FOR UPDATE` clause compiles to nothing).
Upserts use each dialect's own `INSERT ... ON CONFLICT` construct.

Every job status change is a compare-and-set against the state machine in `states`: an UPDATE
that names the states it may come from, so a job cannot be finished twice or revived once done.
Methods take `now` so tests (and a sweeper with its own clock) control time; it defaults to
the current UTC time.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache, lru_cache
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Select,
    Update,
    bindparam,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dippy_studio.orchestrator.batching import Gathered, GroupCommit
from dippy_studio.orchestrator.db import WRITE_OPTION, make_engine, upgrade
from dippy_studio.orchestrator.models import ApiKey, Audit, Base, Job, JobAttempt, Lora, Miner, RateWindow, utcnow
from dippy_studio.orchestrator.states import ACTIVE, NON_TERMINAL, RequestStatus, can_transition
from dippy_studio.protocol.schemas import JobKind

KEY_PREFIX = "dsk_"
_KEY_SECRET = re.compile(r"^dsk_([0-9a-f]{16})_[A-Za-z0-9_-]{32,128}$")
DEFAULT_RATE_LIMIT_PER_MINUTE = 60
RATE_WINDOW = timedelta(minutes=1)
DEFAULT_MAX_ATTEMPTS = 3
# A re-dispatch with less time than this left before the client's deadline would only fail later.
DEFAULT_MIN_ATTEMPT_S = 5.0
SWEEP_BATCH = 500
AUDIT_VERDICTS = frozenset({"pass", "fail", "inconclusive"})
WEBHOOK_STATES = frozenset({"none", "pending", "delivered", "failed"})

T = TypeVar("T")
M = TypeVar("M", ApiKey, Job)
_JOBS = Job.__table__
_ATTEMPTS = JobAttempt.__table__
_JOB_COLUMNS = tuple(_JOBS.columns)

# The oldest queued jobs that still have time, of the wanted kinds; rows another replica is
# claiming right now are skipped (PostgreSQL; SQLite's write lock serializes claims anyway).
_QUEUE = (
    select(*_JOB_COLUMNS)
    .where(
        _JOBS.c.status == RequestStatus.queued.value,
        _JOBS.c.deadline > bindparam("b_now"),
        _JOBS.c.kind.in_(bindparam("b_kinds", expanding=True)),
    )
    .order_by(_JOBS.c.created_at, _JOBS.c.id)
    .limit(bindparam("b_limit"))
    .with_for_update(skip_locked=True)
)
_KEYS_BY_ID = select(*ApiKey.__table__.columns).where(ApiKey.__table__.c.id.in_(bindparam("b_ids", expanding=True)))
# What a claim sets on each job, as one executemany UPDATE (bound as b_<column>).
_CLAIMED = ("status", "attempts", "dispatched_at", "dispatch_deadline", "miner_hotkey", "miner_uid", "started_at",
            "updated_at")  # fmt: skip
_CLAIM = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("b_id"), _JOBS.c.status == RequestStatus.queued.value)
    .values({name: bindparam(f"b_{name}") for name in _CLAIMED})
)

# claim_for_dispatch's miner choice: (job, earlier attempts per hotkey) -> (hotkey, uid), or None.
AssignMiner = Callable[[Job, Counter[str]], tuple[str, int | None] | None]

# Columns a transition may set besides the status (the id, owner and request never change).
_TRANSITION_FIELDS = frozenset(Job.__table__.columns.keys()) - {"id", "api_key_id", "kind", "payload", "status"}
# What a transition out of an attempt says about that attempt, unless the caller says otherwise.
_ATTEMPT_OUTCOME = {
    RequestStatus.queued: "failed",
    RequestStatus.succeeded: "succeeded",
    RequestStatus.failed: "failed",
    RequestStatus.canceled: "canceled",
}


class StoreError(Exception):
    """Base class for the store's own errors."""


class IllegalTransition(StoreError, ValueError):
    """The state machine has no such transition: a bug in the caller, not a race."""


class UnknownApiKey(StoreError, LookupError):
    """No API key has this id."""


@dataclass(frozen=True)
class NewApiKey:
    """A freshly created key. `secret` and `key.webhook_secret` must be shown to the client now:
    the secret is never stored and cannot be recovered."""

    key: ApiKey
    secret: str


@dataclass(frozen=True)
class Admission:
    """What `Store.admit` decided for one request."""

    key: ApiKey | None  # None: no live key has this secret (malformed, unknown or revoked)
    retry_after: float | None = None  # seconds until the key's next window, when it is over its limit


@dataclass(frozen=True)
class SweepResult:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _key_id(secret: str) -> str | None:
    match = _KEY_SECRET.match(secret)
    return f"key_{match.group(1)}" if match else None


def _live(secret: str, key: ApiKey | None) -> ApiKey | None:
    """The key if it is live and this is its secret (compared in constant time)."""
    if key is None or key.revoked_at is not None:
        return None
    return key if hmac.compare_digest(key.key_hash, hash_secret(secret)) else None


def _until_next_window(now: datetime) -> float:
    """Seconds until the next rate-limit window (the next minute) opens."""
    return (now.replace(second=0, microsecond=0) + RATE_WINDOW - now).total_seconds()


def new_job_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def job_row(
    api_key_id: str,
    kind: JobKind | str,
    payload: Mapping[str, Any],
    deadline: datetime,
    attempt_timeout_s: float,
    *,
    webhook_url: str | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    audit: bool = False,
    job_id: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """A new queued job's row, for `Store.insert_jobs`."""
    if attempt_timeout_s <= 0:
        raise ValueError("attempt_timeout_s must be positive")
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    now = now or utcnow()
    return {column.key: None for column in _JOB_COLUMNS} | {
        "id": job_id or new_job_id(),
        "api_key_id": api_key_id,
        "kind": JobKind(kind).value,
        "status": RequestStatus.queued.value,
        "payload": dict(payload),
        "created_at": now,
        "updated_at": now,
        "deadline": deadline,
        "attempts": 0,
        "max_attempts": max_attempts,
        "attempt_timeout_s": float(attempt_timeout_s),
        "timings": {},
        "webhook_url": webhook_url,
        "webhook_state": "pending" if webhook_url else "none",
        "webhook_attempts": 0,
        "audit": audit,
    }


class Store:
    def __init__(self, url_or_engine: str | URL | Engine, writers: int = 1) -> None:
        """`writers`: threads writing groups of transactions (`batching.GroupCommit`). More than one
        helps only PostgreSQL (SQLite has one writer at a time), and only a single orchestrator
        process: with `serve --workers 3`, three writers each were slower than one (bench_throughput)."""
        self.engine = url_or_engine if isinstance(url_or_engine, Engine) else make_engine(url_or_engine)
        self.dialect = self.engine.dialect.name
        # expire_on_commit=False: returned rows stay readable after their session is gone.
        self._reads = sessionmaker(self.engine, expire_on_commit=False)
        writer = self.engine.execution_options(**{WRITE_OPTION: True})
        self._writes = sessionmaker(writer, expire_on_commit=False)
        # The request path's writes (jobs in, claims, transitions) share transactions under load.
        self._group = GroupCommit(writer.begin, writers=writers)
        # Single statements on PostgreSQL need no BEGIN and COMMIT (two round trips of three).
        self._autocommit = (
            self.engine.execution_options(isolation_level="AUTOCOMMIT") if self.dialect == "postgresql" else self.engine
        )

    @classmethod
    def open(cls, url: str | URL, migrate: bool = True, writers: int = 1) -> Store:
        """A store on `url`, its schema brought up to date first (the usual way to start)."""
        store = cls(url, writers)
        if migrate:
            upgrade(store.engine)
        return store

    def close(self) -> None:
        self._group.close()
        self.engine.dispose()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._reads() as session:
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        if self._group.on_writer_thread():
            # Called by an operation of a group: join its transaction. A transaction of its own
            # would wait for the group's write lock, which this very thread holds.
            with Session(self._group.connection(), expire_on_commit=False, join_transaction_mode="rollback_only") as s:
                yield s
                s.flush()
            return
        with self._writes.begin() as session:
            yield session

    def _grouped(self, fn: Callable[[Connection], T], lock_key: str = "") -> T:
        """Run `fn` in a write transaction shared with whatever other writes arrive meanwhile
        (`batching.GroupCommit`, which orders a group by `lock_key`); returns once it has committed."""
        return self._group.run(fn, lock_key)

    def submit(
        self, fn: Callable[[], T], lock_key: str = "", prepare: Callable[[], object] | Gathered[Any, Any] | None = None
    ) -> asyncio.Future[T]:
        """For an event loop: run `fn()`, a function calling this store, on the store's writer
        thread, its writes in a transaction shared with whatever else is queued (see
        `batching.GroupCommit`: `lock_key` and `prepare` are its). Await the result."""
        return self._group.submit(fn, lock_key, prepare)

    def _insert(self, model: type) -> Any:
        """The dialect's INSERT, which knows ON CONFLICT (the generic one does not)."""
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(model)

    # ---- API keys ---------------------------------------------------------------------------

    def create_api_key(
        self, name: str, rate_limit_per_minute: int = DEFAULT_RATE_LIMIT_PER_MINUTE, now: datetime | None = None
    ) -> NewApiKey:
        if not name.strip():
            raise ValueError("an API key needs a name")
        if rate_limit_per_minute < 1:
            raise ValueError("rate_limit_per_minute must be at least 1")
        short_id = secrets.token_hex(8)
        secret = f"{KEY_PREFIX}{short_id}_{secrets.token_urlsafe(32)}"
        key = ApiKey(
            id=f"key_{short_id}",
            name=name.strip(),
            key_hash=hash_secret(secret),
            # Standard Webhooks secret format: "whsec_" + base64 of the HMAC key bytes.
            webhook_secret="whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
            rate_limit_per_minute=rate_limit_per_minute,
            created_at=now or utcnow(),
        )
        with self._write() as session:
            session.add(key)
        return NewApiKey(key=key, secret=secret)

    def list_api_keys(self, include_revoked: bool = True) -> list[ApiKey]:
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        with self._read() as session:
            return list(session.scalars(query))

    def get_api_key(self, key_id: str) -> ApiKey | None:
        with self._read() as session:
            return session.get(ApiKey, key_id)

    def revoke_api_key(self, key_id: str, now: datetime | None = None) -> bool:
        """True when this call revoked the key, False when it was already revoked."""
        with self._write() as session:
            key = session.get(ApiKey, key_id)
            if key is None:
                raise UnknownApiKey(key_id)
            if key.revoked_at is not None:
                return False
            key.revoked_at = now or utcnow()
            return True

    def authenticate(self, secret: str) -> ApiKey | None:
        """The live key whose secret this is, or None. Looks up by the id inside the secret and
        compares hashes in constant time, so neither plaintext nor timing gives a key away."""
        key_id = _key_id(secret)
        return _live(secret, self._by_id(ApiKey, key_id)) if key_id else None

    def admit(self, secrets: Sequence[str], now: datetime | None = None) -> list[Admission]:
        """`authenticate` each request's secret and count each one that has a live key against
        that key's per-minute limit (see `hit_rate_limit`), all together: one read of the keys and
        one count per key, however many requests. Requests of one key are counted in order."""
        now = now or utcnow()
        wanted = sorted({key_id for secret in secrets if (key_id := _key_id(secret))})
        found: dict[str, ApiKey] = {}
        if wanted:
            with self._autocommit.connect() as conn:
                found = {row.id: ApiKey(**row._mapping) for row in conn.execute(_KEYS_BY_ID, {"b_ids": wanted})}
        keys = [_live(secret, found.get(_key_id(secret) or "")) for secret in secrets]
        requests = Counter(key.id for key in keys if key is not None)
        # The count after this batch, handed out in order: the first of n requests gets count - n + 1.
        next_count = {key_id: self._count_requests(key_id, n, now) - n + 1 for key_id, n in requests.items()}
        until_next_window = _until_next_window(now)
        admissions = []
        for key in keys:
            if key is None:
                admissions.append(Admission(None))
                continue
            count, next_count[key.id] = next_count[key.id], next_count[key.id] + 1
            admissions.append(Admission(key, None if count <= key.rate_limit_per_minute else until_next_window))
        return admissions

    def hit_rate_limit(self, api_key_id: str, now: datetime | None = None, limit: int | None = None) -> float | None:
        """Count one request for the key. None when it is within its per-minute limit, else the
        seconds until the next window opens. One atomic upsert per call, so every process sharing
        the database shares the count. Fixed windows may let a client burst up to twice its limit
        across a window boundary; that is the price of one row per key per minute. `limit` is the
        key's `rate_limit_per_minute` when the caller has just read the key (else it is read)."""
        now = now or utcnow()
        if limit is None:
            key = self.get_api_key(api_key_id)
            if key is None:
                raise UnknownApiKey(api_key_id)
            limit = key.rate_limit_per_minute
        if self._count_requests(api_key_id, 1, now) <= limit:
            return None
        return _until_next_window(now)

    def _count_requests(self, api_key_id: str, n: int, now: datetime) -> int:
        """Add `n` requests to the key's count for the minute of `now`; returns the new count."""
        window = now.replace(second=0, microsecond=0)
        upsert = self._insert(RateWindow).values(api_key_id=api_key_id, window_start=window, count=n)
        upsert = upsert.on_conflict_do_update(
            index_elements=[RateWindow.api_key_id, RateWindow.window_start],
            set_={"count": RateWindow.count + n},
        ).returning(RateWindow.count)
        prune = RateWindow.__table__.delete().where(
            RateWindow.api_key_id == api_key_id, RateWindow.window_start < window
        )

        def count(conn: Connection) -> int:
            try:
                total = conn.scalar(upsert)
            except IntegrityError:  # the key's row is gone (a foreign key)
                raise UnknownApiKey(api_key_id) from None
            if total == n:
                # First requests of a new window: the key's older windows will never be read again.
                conn.execute(prune)
            return total

        if self.dialect == "postgresql":
            # Every request of a key updates this one row, so its lock is the busiest there is:
            # taken by one statement in autocommit, never held across a group's other writes, which
            # would queue replicas behind each other's groups (and deadlock them on the jobs' rows).
            with self._autocommit.connect() as conn:
                return count(conn)
        return self._grouped(count)

    # ---- jobs -------------------------------------------------------------------------------

    def create_job(
        self,
        api_key_id: str,
        kind: JobKind | str,
        payload: Mapping[str, Any],
        deadline: datetime,
        attempt_timeout_s: float,
        **options: Any,
    ) -> Job:
        """A new queued job; `options` are `job_row`'s (webhook_url, max_attempts, audit, job_id, now)."""
        return self.insert_jobs([job_row(api_key_id, kind, payload, deadline, attempt_timeout_s, **options)])[0]

    def insert_jobs(self, rows: Sequence[Mapping[str, Any]]) -> list[Job]:
        """New queued jobs from `job_row`s, in one statement."""
        if rows:
            # Core, not the ORM's unit of work: a third of the time, on the path of every request.
            self._grouped(lambda conn: conn.execute(insert(_JOBS), list(rows)))
        return [Job(**row) for row in rows]

    def get_job(self, job_id: str, api_key_id: str) -> Job | None:
        """The job if it belongs to this key; a client never learns that another key's job exists."""
        with self._read() as session:
            return session.scalar(select(Job).where(Job.id == job_id, Job.api_key_id == api_key_id))

    def load_job(self, job_id: str) -> Job | None:
        """Any job by id, for the orchestrator itself (callbacks, audits); never for client requests."""
        return self._by_id(Job, job_id)

    def _by_id(self, model: type[M], key: str) -> M | None:
        """One row by primary key, read with a prepared Core statement: on the path of every
        request and callback, where an ORM session's get costs three times as much."""
        with self._autocommit.connect() as conn:
            row = conn.execute(_by_id_statement(model), {"b_id": key}).first()
        return None if row is None else model(**row._mapping)

    def load_jobs(self, job_ids: Iterable[str], chunk: int = 500) -> dict[str, Job]:
        """Jobs by id, read in chunks (one query per `chunk` ids, not one per job)."""
        ids = sorted(set(job_ids))
        found: dict[str, Job] = {}
        with self._read() as session:
            for first in range(0, len(ids), chunk):
                for job in session.scalars(select(Job).where(Job.id.in_(ids[first : first + chunk]))):
                    found[job.id] = job
        return found

    def list_jobs(
        self,
        api_key_id: str,
        *,
        status: RequestStatus | str | None = None,
        before: datetime | None = None,
        limit: int = 50,
    ) -> list[Job]:
        """A key's jobs, newest first; `before` pages back through older ones."""
        query = select(Job).where(Job.api_key_id == api_key_id)
        if status is not None:
            query = query.where(Job.status == RequestStatus(status).value)
        if before is not None:
            query = query.where(Job.created_at < before)
        query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
        with self._read() as session:
            return list(session.scalars(query))

    def list_recent_jobs(self, since: datetime, limit: int = 5000) -> list[Job]:
        """Every key's jobs created since `since`, newest first (the dashboard's view)."""
        query = select(Job).where(Job.created_at >= since).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
        with self._read() as session:
            return list(session.scalars(query))

    def transition(
        self,
        job_id: str,
        frm: RequestStatus | str | Iterable[RequestStatus | str],
        to: RequestStatus | str,
        *,
        now: datetime | None = None,
        attempt_outcome: str | None = None,
        attempt_error: str | None = None,
        **fields: Any,
    ) -> bool:
        """Move a job from one of the states `frm` to `to`, setting `fields` with it, if and only if
        it is still in one of those states. False when it was not (another process got there first).

        Timestamps follow the state (dispatched_at, started_at, finished_at) unless given; going back
        to `queued` clears the current miner. Leaving an attempt (re-queue or a terminal state)
        closes the open JobAttempt row with `attempt_outcome` (default: what the new state implies).
        """
        sources = {RequestStatus(frm)} if isinstance(frm, str) else {RequestStatus(s) for s in frm}
        target = RequestStatus(to)
        illegal = sorted(s.value for s in sources if not can_transition(s, target))
        if not sources or illegal:
            raise IllegalTransition(f"{', '.join(illegal) or '(nothing)'} -> {target.value} is not a job transition")
        unknown = set(fields) - _TRANSITION_FIELDS
        if unknown:
            raise TypeError(f"transition cannot set {', '.join(sorted(unknown))}")
        now = now or utcnow()
        values = {**_implied_fields(target, now), **fields, "status": target.value, "updated_at": now}
        statement_key = (tuple(sorted(s.value for s in sources)), tuple(sorted(values)))
        statement = _transition_statement(*statement_key)
        params = {"b_id": job_id} | {f"b_{name}": value for name, value in values.items()}

        closes = target in _ATTEMPT_OUTCOME
        outcome = attempt_outcome or _ATTEMPT_OUTCOME.get(target, "")

        def move(conn: Connection) -> bool:
            if closes and conn.dialect.name == "postgresql":
                both = _transition_closing_statement(statement_key[0], statement_key[1])
                return conn.scalar(both, params | _attempt_params(job_id, outcome, attempt_error, now)) == 1
            if conn.execute(statement, params).rowcount != 1:
                return False
            if closes:
                _close_attempt(conn, job_id, outcome, attempt_error, now)
            return True

        return self._grouped(move, lock_key=job_id)

    def mark_running(self, job_ids: Collection[str], now: datetime | None = None) -> set[str]:
        """`dispatched -> running` for those of these jobs still dispatched, in one transaction (the
        dispatcher batches its accepted sends). Returns the ids that moved. A job whose row another
        transaction holds is skipped rather than waited for: mostly that is its callback (or a
        cancel) finishing it; a replica's claim can hold it for a moment too, so the dispatcher
        tries the ones left over again."""
        if not job_ids:
            return set()
        now = now or utcnow()
        values = {
            **_implied_fields(RequestStatus.running, now),
            "status": RequestStatus.running.value,
            "updated_at": now,
        }
        # Waiting would also risk a deadlock with a replica's group of transitions on these rows.
        free = (
            select(_JOBS.c.id)
            .where(_JOBS.c.id.in_(sorted(job_ids)), _JOBS.c.status == RequestStatus.dispatched.value)
            .with_for_update(skip_locked=True)
        )
        statement = update(_JOBS).where(_JOBS.c.id.in_(free)).values(values).returning(_JOBS.c.id)
        return self._grouped(lambda conn: set(conn.scalars(statement)))

    def flag_for_audit(self, job_id: str) -> None:
        """Record that a job was picked for an audit (`flagged_without_verdict` finds it after a restart)."""
        statement = update(_JOBS).where(_JOBS.c.id == job_id).values(audit=True)
        self._grouped(lambda conn: conn.execute(statement), lock_key=job_id)

    def cancel_job(self, job_id: str, api_key_id: str, now: datetime | None = None) -> bool:
        """Cancel a key's own job if it has not finished; False if it had (or is not theirs)."""
        now = now or utcnow()
        with self._write() as session:
            result = session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.api_key_id == api_key_id,
                    Job.status.in_([s.value for s in NON_TERMINAL]),
                )
                .values(
                    status=RequestStatus.canceled.value, finished_at=now, updated_at=now, error="canceled by client"
                )
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:
                return False
            _close_attempt(session.connection(), job_id, "canceled", None, now)
            return True

    def claim_for_dispatch(
        self,
        limit: int,
        now: datetime | None = None,
        kinds: Iterable[JobKind | str] | None = None,
        assign: AssignMiner | None = None,
    ) -> list[Job]:
        """Take up to `limit` queued jobs, oldest first, and mark them dispatched: each is returned
        to exactly one caller, however many processes claim at once. Counts the attempt and sets its
        timeout, capped by the client's deadline. The caller then picks a miner (`assign_miner`) or
        hands the job back (`transition(id, "dispatched", "queued")`).

        With `assign`, the miners are picked in the same transaction instead (one write for the
        batch rather than one more per job): `assign(job, tried)` gets the job and how many earlier
        attempts each hotkey had at it, and returns the (hotkey, uid) to record as `assign_miner`
        would, or None to leave the job queued untouched (no attempt counted); only jobs that got
        a miner are returned."""
        now = now or utcnow()
        wanted = [JobKind(k).value for k in (JobKind if kinds is None else kinds)]
        params = {"b_now": now, "b_kinds": wanted, "b_limit": limit}

        def claim(conn: Connection) -> list[Job]:
            # Core statements, one UPDATE and one INSERT for the whole batch: the ORM's unit of work
            # cost more than everything else the dispatcher does per job.
            jobs = [Job(**row._mapping) for row in conn.execute(_QUEUE, params)] if wanted else []
            tried = _tried(conn, [job.id for job in jobs if job.attempts > 0]) if assign else {}
            taken, claims, attempts = [], [], []
            for job in jobs:
                miner = assign(job, tried.get(job.id, Counter())) if assign else None
                if assign is not None and miner is None:
                    continue
                job.status = RequestStatus.dispatched.value
                job.attempts += 1
                job.dispatched_at = job.updated_at = now
                job.dispatch_deadline = min(now + timedelta(seconds=job.attempt_timeout_s), job.deadline)
                job.miner_hotkey, job.miner_uid = miner or (None, None)
                job.started_at = None
                claims.append({"b_id": job.id} | {f"b_{name}": getattr(job, name) for name in _CLAIMED})
                if miner is not None:
                    attempts.append(
                        {
                            "job_id": job.id,
                            "attempt": job.attempts,
                            "miner_hotkey": job.miner_hotkey,
                            "miner_uid": job.miner_uid,
                            "dispatched_at": now,
                        }
                    )
                taken.append(job)
            if claims:
                conn.execute(_CLAIM, claims)
            if attempts:
                conn.execute(insert(_ATTEMPTS), attempts)
            return taken

        return self._grouped(claim)

    def assign_miner(
        self, job_id: str, miner_hotkey: str, miner_uid: int | None, now: datetime | None = None
    ) -> JobAttempt | None:
        """Record that this dispatched job is being sent to this miner, opening its JobAttempt.
        None when the job is no longer dispatched or already has a miner for this attempt."""
        now = now or utcnow()
        with self._write() as session:
            job = session.scalar(
                select(Job)
                .where(Job.id == job_id, Job.status == RequestStatus.dispatched.value, Job.miner_hotkey.is_(None))
                .with_for_update()
            )
            if job is None:
                return None
            job.miner_hotkey, job.miner_uid, job.dispatched_at, job.updated_at = miner_hotkey, miner_uid, now, now
            attempt = JobAttempt(
                job_id=job_id, attempt=job.attempts, miner_hotkey=miner_hotkey, miner_uid=miner_uid, dispatched_at=now
            )
            session.add(attempt)
        return attempt

    def list_attempts(
        self, job_id: str | None = None, *, miner_hotkey: str | None = None, since: datetime | None = None
    ) -> list[JobAttempt]:
        """Attempts in dispatch order: one job's (to skip miners that failed it), or a miner's."""
        query = select(JobAttempt).order_by(JobAttempt.dispatched_at, JobAttempt.id)
        if job_id is not None:
            query = query.where(JobAttempt.job_id == job_id)
        if miner_hotkey is not None:
            query = query.where(JobAttempt.miner_hotkey == miner_hotkey)
        if since is not None:
            query = query.where(JobAttempt.dispatched_at >= since)
        with self._read() as session:
            return list(session.scalars(query))

    def sweep(self, now: datetime | None = None, min_attempt_s: float = DEFAULT_MIN_ATTEMPT_S) -> SweepResult:
        """Take back jobs whose miner ran out of time, and fail jobs whose client deadline passed.

        A timed-out job goes back to the queue (for another miner; its attempt is recorded as a
        timeout) while it has attempts left and at least `min_attempt_s` before the client's
        deadline; otherwise it fails. Queued jobs past their deadline fail. Rows another sweeper
        holds are skipped, so several orchestrators may sweep at once.
        """
        now = now or utcnow()
        result = SweepResult()
        with self._write() as session:
            # Materialized: the loop below runs queries of its own on this session.
            stuck = list(
                session.scalars(
                    select(Job)
                    .where(Job.status.in_([s.value for s in ACTIVE]), Job.dispatch_deadline <= now)
                    .order_by(Job.dispatch_deadline)
                    .limit(SWEEP_BATCH)
                    .with_for_update(skip_locked=True)
                )
            )
            for job in stuck:
                miner = f"miner {job.miner_uid if job.miner_uid is not None else job.miner_hotkey}"
                _close_attempt(
                    session.connection(), job.id, "timeout", f"no result within {job.attempt_timeout_s:g}s", now
                )
                left = (job.deadline - now).total_seconds()
                if job.attempts < job.max_attempts and left > 0 and left >= min_attempt_s:
                    job.status = RequestStatus.queued.value
                    for name, value in _implied_fields(RequestStatus.queued, now).items():
                        setattr(job, name, value)
                    result.requeued.append(job.id)
                else:
                    job.status = RequestStatus.failed.value
                    job.finished_at = now
                    where = miner if job.miner_hotkey else "before a miner was assigned"
                    job.error = f"attempt {job.attempts} timed out ({where}); no time or attempts left for another"
                    result.failed.append(job.id)
                job.updated_at = now
            expired = session.scalars(
                select(Job)
                .where(Job.status == RequestStatus.queued.value, Job.deadline <= now)
                .limit(SWEEP_BATCH)
                .with_for_update(skip_locked=True)
            )
            for job in expired:
                job.status = RequestStatus.failed.value
                job.finished_at = job.updated_at = now
                job.error = "deadline passed before a miner could finish the job"
                result.failed.append(job.id)
        return result

    # ---- miners -----------------------------------------------------------------------------

    def upsert_miner(
        self,
        hotkey: str,
        uid: int,
        *,
        coldkey: str | None = None,
        endpoint: str | None = None,
        stake: float = 0.0,
        now: datetime | None = None,
    ) -> None:
        """Insert or refresh a miner from the metagraph; its health and score are left alone."""
        now = now or utcnow()
        chain = {"uid": uid, "coldkey": coldkey, "endpoint": endpoint, "stake": stake, "updated_at": now}
        upsert = self._insert(Miner).values(
            hotkey=hotkey, healthy=False, capacity={}, fingerprints=[], score=0.0, created_at=now, **chain
        )
        with self._write() as session:
            session.execute(upsert.on_conflict_do_update(index_elements=[Miner.hotkey], set_=chain))

    def record_probe(
        self,
        hotkey: str,
        healthy: bool,
        *,
        capacity: Mapping[str, Any] | None = None,
        fingerprints: Iterable[str] | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Store a health probe's outcome. False for a miner the store does not know."""
        now = now or utcnow()
        values: dict[str, Any] = {"healthy": healthy, "last_probe_at": now, "updated_at": now}
        if capacity is not None:
            values["capacity"] = dict(capacity)
        if fingerprints is not None:
            values["fingerprints"] = list(fingerprints)
        with self._write() as session:
            result = session.execute(update(Miner).where(Miner.hotkey == hotkey).values(values))
            return result.rowcount == 1

    def set_scores(self, scores: Mapping[str, float], now: datetime | None = None) -> None:
        now = now or utcnow()
        with self._write() as session:
            for hotkey, score in scores.items():
                session.execute(update(Miner).where(Miner.hotkey == hotkey).values(score=score, updated_at=now))

    def get_miner(self, hotkey: str) -> Miner | None:
        with self._read() as session:
            return session.get(Miner, hotkey)

    def list_miners(self, healthy_only: bool = False) -> list[Miner]:
        query = select(Miner).order_by(Miner.uid, Miner.hotkey)
        if healthy_only:
            query = query.where(Miner.healthy.is_(True))
        with self._read() as session:
            return list(session.scalars(query))

    # ---- LoRAs ------------------------------------------------------------------------------

    def create_lora(
        self,
        api_key_id: str,
        name: str,
        sha256: str,
        rank: int,
        *,
        trigger_word: str = "",
        source_job_id: str | None = None,
        lora_id: str | None = None,
        now: datetime | None = None,
    ) -> Lora:
        lora = Lora(
            id=lora_id or f"lora_{uuid.uuid4().hex}",
            api_key_id=api_key_id,
            name=name,
            sha256=sha256,
            rank=rank,
            trigger_word=trigger_word,
            source_job_id=source_job_id,
            created_at=now or utcnow(),
        )
        with self._write() as session:
            session.add(lora)
        return lora

    def get_lora(self, lora_id: str, api_key_id: str) -> Lora | None:
        with self._read() as session:
            return session.scalar(select(Lora).where(Lora.id == lora_id, Lora.api_key_id == api_key_id))

    def list_loras(self, api_key_id: str) -> list[Lora]:
        query = select(Lora).where(Lora.api_key_id == api_key_id).order_by(Lora.created_at.desc(), Lora.id)
        with self._read() as session:
            return list(session.scalars(query))

    # ---- audits -----------------------------------------------------------------------------

    def add_audit(
        self,
        job_id: str,
        miner_hotkey: str,
        verdict: str,
        evidence: Mapping[str, Any] | None = None,
        now: datetime | None = None,
    ) -> Audit:
        if verdict not in AUDIT_VERDICTS:
            raise ValueError(f"verdict must be one of {sorted(AUDIT_VERDICTS)}")
        audit = Audit(
            job_id=job_id,
            miner_hotkey=miner_hotkey,
            verdict=verdict,
            evidence=dict(evidence or {}),
            created_at=now or utcnow(),
        )
        with self._write() as session:
            session.add(audit)
        return audit

    def flagged_without_verdict(self, limit: int = 10_000) -> list[str]:
        """Jobs picked for an audit that has no verdict yet, oldest first: an orchestrator stopped
        before it got to them. `AuditQueue.start` queues them again."""
        query = (
            select(Job.id)
            .where(Job.audit.is_(True), ~exists().where(Audit.job_id == Job.id))
            .order_by(Job.updated_at, Job.id)
            .limit(limit)
        )
        with self._read() as session:
            return list(session.scalars(query))

    def get_audit(self, audit_id: int) -> Audit | None:
        with self._read() as session:
            return session.get(Audit, audit_id)

    def list_audits(
        self,
        *,
        job_id: str | None = None,
        miner_hotkey: str | None = None,
        since: datetime | None = None,
        verdict: str | None = None,
    ) -> list[Audit]:
        query = select(Audit).order_by(Audit.created_at, Audit.id)
        if verdict is not None:
            query = query.where(Audit.verdict == verdict)
        if job_id is not None:
            query = query.where(Audit.job_id == job_id)
        if miner_hotkey is not None:
            query = query.where(Audit.miner_hotkey == miner_hotkey)
        if since is not None:
            query = query.where(Audit.created_at >= since)
        with self._read() as session:
            return list(session.scalars(query))


def _implied_fields(target: RequestStatus, now: datetime) -> dict[str, Any]:
    if target is RequestStatus.queued:
        # Back in the queue: the next dispatch starts clean; history stays in job_attempts.
        return {
            "miner_hotkey": None,
            "miner_uid": None,
            "dispatched_at": None,
            "dispatch_deadline": None,
            "started_at": None,
        }
    if target is RequestStatus.dispatched:
        return {"dispatched_at": now}
    if target is RequestStatus.running:
        return {"started_at": now}
    return {"finished_at": now}


def _tried(conn: Connection, job_ids: list[str]) -> dict[str, Counter[str]]:
    """Earlier attempts per job and hotkey, for jobs going out again."""
    tried: dict[str, Counter[str]] = {}
    if job_ids:
        query = select(_ATTEMPTS.c.job_id, _ATTEMPTS.c.miner_hotkey).where(_ATTEMPTS.c.job_id.in_(job_ids))
        for job_id, hotkey in conn.execute(query):
            tried.setdefault(job_id, Counter())[hotkey] += 1
    return tried


@cache
def _by_id_statement(model: type[Base]) -> Select[Any]:
    table = model.__table__
    (key,) = table.primary_key.columns
    return select(*table.columns).where(key == bindparam("b_id"))


@lru_cache(maxsize=256)
def _transition_statement(sources: tuple[str, ...], names: tuple[str, ...]) -> Update:
    """`UPDATE jobs SET <names> WHERE id = :b_id AND status IN <sources>`, built once per shape
    (a handful in all): building and keying a statement costs more than running it."""
    return (
        update(_JOBS)
        .where(_JOBS.c.id == bindparam("b_id"), _JOBS.c.status.in_(sources))
        .values({name: bindparam(f"b_{name}") for name in names})
    )


# Closing a job's open attempt (there is at most one: every move out of an attempt closes it).
def _closing_attempts(jobs: ColumnElement[bool], latency: ColumnElement[float] | None) -> Update:
    values: dict[str, Any] = {
        "outcome": bindparam("b_attempt_outcome"),
        "error": bindparam("b_attempt_error"),
        "finished_at": bindparam("b_attempt_finished_at", type_=_ATTEMPTS.c.finished_at.type),
    }
    if latency is not None:
        values["latency_s"] = latency
    return update(_ATTEMPTS).where(jobs, _ATTEMPTS.c.outcome.is_(None)).values(values)


# PostgreSQL works the latency out from the attempt's own dispatch time in the same statement: one
# round trip instead of two. SQLite's date functions count milliseconds, so there the dispatch time
# is read first; a statement there costs microseconds, not a round trip.
_PG_LATENCY = func.greatest(
    0.0,
    func.extract(
        "epoch",
        bindparam("b_attempt_finished_at", type_=_ATTEMPTS.c.finished_at.type) - _ATTEMPTS.c.dispatched_at,
    ),
)
_THIS_JOB = _ATTEMPTS.c.job_id == bindparam("b_job_id")
_CLOSE_ATTEMPTS_PG = _closing_attempts(_THIS_JOB, _PG_LATENCY)
_CLOSE_ATTEMPTS_SQLITE = _closing_attempts(_THIS_JOB, bindparam("b_latency_s"))
_OPEN_ATTEMPT = select(_ATTEMPTS.c.dispatched_at).where(_THIS_JOB, _ATTEMPTS.c.outcome.is_(None))


@lru_cache(maxsize=256)
def _transition_closing_statement(sources: tuple[str, ...], names: tuple[str, ...]) -> Select[Any]:
    """PostgreSQL: `_transition_statement` and the close of the job's attempt as one statement
    (data-modifying CTEs), which counts the jobs moved (0 or 1): on the path of every callback."""
    moved = _transition_statement(sources, names).returning(_JOBS.c.id).cte("moved")
    closed = _closing_attempts(_ATTEMPTS.c.job_id.in_(select(moved.c.id)), _PG_LATENCY).cte("closed")
    return select(func.count()).select_from(moved).add_cte(closed)


def _attempt_params(job_id: str, outcome: str, error: str | None, now: datetime) -> dict[str, Any]:
    return {"b_job_id": job_id, "b_attempt_outcome": outcome, "b_attempt_error": error, "b_attempt_finished_at": now}


def _close_attempt(conn: Connection, job_id: str, outcome: str, error: str | None, now: datetime) -> None:
    params = _attempt_params(job_id, outcome, error, now)
    if conn.dialect.name == "postgresql":
        conn.execute(_CLOSE_ATTEMPTS_PG, params)
        return
    dispatched_at = conn.scalar(_OPEN_ATTEMPT, params)
    if dispatched_at is not None:
        latency = max(0.0, (now - dispatched_at).total_seconds())
        conn.execute(_CLOSE_ATTEMPTS_SQLITE, params | {"b_latency_s": latency})
