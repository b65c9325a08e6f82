"""The storage layer: every SQL statement of the orchestrator, in one place.

How to read a call:

- **A method that writes is one transaction.** When it returns, its change has committed; when it
  raises, nothing of it was written. No write method calls another, so there is never a question
  of whose transaction a statement runs in.
- **Writes run on the store's writer thread** (`writer.Writer`). It commits whatever calls arrived
  while it was busy in one transaction, which is invisible to callers except in speed: each call
  still commits or fails alone (a failing call's group is rolled back and re-run call by call).
  A thread simply calls the method (it blocks until the commit); an event loop awaits
  `store.call(store.method, *args)`, which runs the method on the writer thread.
- **Reads** run on the calling thread, each on a connection of its own (in autocommit on
  PostgreSQL: no BEGIN/COMMIT round trips).
- **Job states** change in `transition` (one job), `claim_for_dispatch`, `mark_running` and
  `sweep` (many), always as compare-and-set UPDATEs that name the states they may come from; the
  database refuses any change the state machine does not allow (a trigger, see `states`).

SQLite and PostgreSQL differ only here: PostgreSQL claims rows with `FOR UPDATE SKIP LOCKED`, so
several orchestrator processes can share one queue; SQLite serializes writers (see `db`). Methods
take `now` so tests control time; it defaults to the current UTC time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache, lru_cache
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    FromClause,
    Select,
    Update,
    and_,
    bindparam,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import sessionmaker

from dippy_studio.orchestrator import usage
from dippy_studio.orchestrator.db import WRITE_OPTION, make_engine, process_shard, upgrade
from dippy_studio.orchestrator.errors import OrchestratorError, QuotaExceeded, RateLimited, Unauthorized
from dippy_studio.orchestrator.models import (
    DEFAULT_MODEL,
    ApiKey,
    Audit,
    Base,
    Job,
    JobAttempt,
    Lora,
    Miner,
    RateWindow,
    detached,
    utcnow,
)
from dippy_studio.orchestrator.states import (
    ACTIVE,
    CLIENTS_DOING,
    NON_TERMINAL,
    NOT_TAKEN,
    TERMINAL,
    RequestStatus,
    can_transition,
    is_illegal_transition,
)
from dippy_studio.orchestrator.writer import Writer

log = logging.getLogger("dippy_studio.orchestrator.store")

KEY_PREFIX = "dsk_"
# PostgreSQL's channel for job events (migration 0004), and how often a listener checks for stop.
JOB_EVENTS_CHANNEL = "dippy_jobs"
LISTEN_POLL_S = 1.0
# The job event (in place of a status) that says a job's progress changed (`record_progress`).
PROGRESS_EVENT = "progress"
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
_KEYS = ApiKey.__table__
_JOB_COLUMNS = tuple(_JOBS.columns)
# Picked for an audit and not judged yet: the partial index `ix_jobs_audit_owed` holds these.
_OWED = _JOBS.c.audit_owed.is_(true())


def _one_of(column: ColumnElement[str], values: Iterable[str]) -> ColumnElement[bool]:
    """`column IN (...)` with a fixed list of values as plain parameters: SQLAlchemy's IN of a
    list renders the statement again at every execution, on the hottest statements there are."""
    return column.in_([literal(str(value)) for value in sorted(values)])


# Queued jobs that still have time, of the wanted kinds, in fair turns between keys: a job's turn
# is its place in its key's queue plus the jobs that key already has out at miners, so the key
# with the least work under way goes first and one client's flood cannot keep the others waiting
# behind it. Rows another replica is claiming right now are skipped (PostgreSQL; SQLite's write
# lock serializes claims anyway): the limit applies after the skip, so replicas claiming at once
# take different jobs rather than waiting on the same first few.
#
# Only the first `CLAIM_CANDIDATES` x limit jobs by turn are candidates. On PostgreSQL they come
# from each key's first few queued jobs, read in index order (`_candidates_by_key`), so a claim
# costs the same however long the queue: a window over the whole queue grows with the backlog,
# and PostgreSQL, planning it with statistics that lag far behind a burst of submissions, could
# run it again for every queued job, on the store's writer thread that every write waits for
# (bench/README.md, throughput). SQLite has no LATERAL join: it reads each key's first few with
# a correlated subquery instead, and numbers only those, in one statement (`_queue`).
CLAIM_CANDIDATES = 4
_UNDER_WAY = (
    select(_JOBS.c.api_key_id, func.count().label("jobs"))
    .where(_one_of(_JOBS.c.status, ACTIVE))
    .group_by(_JOBS.c.api_key_id)
    .cte("under_way")
    .prefix_with("MATERIALIZED", dialect="postgresql")
)


def _wanted(by_model: bool, jobs: FromClause = _JOBS) -> list[ColumnElement[bool]]:
    """Queued jobs that still have time, of the wanted kinds (`b_kinds`) and, `by_model`, models
    (`b_models`), so jobs of a model no miner serves now do not fill the batch ahead of those
    that can go."""
    wanted = [
        jobs.c.status == RequestStatus.queued.value,
        jobs.c.deadline > bindparam("b_now"),
        jobs.c.kind.in_(bindparam("b_kinds", expanding=True)),
    ]
    if by_model:
        wanted.append(jobs.c.model.in_(bindparam("b_models", expanding=True)))
    return wanted


def _queue(by_model: bool) -> Select[Any]:
    """SQLite's claim: each key's first few queued jobs (a correlated subquery per key, in the
    order of the index `ix_jobs_queue_by_key`: SQLite has no LATERAL), numbered into turns, then
    the first `b_limit` of them."""
    mine = _JOBS.alias("mine")
    firsts = (
        select(mine.c.id)
        .where(mine.c.api_key_id == _KEYS.c.id, *_wanted(by_model, mine))
        .order_by(mine.c.created_at, mine.c.id)
        .limit(bindparam("b_candidates"))
        .correlate(_KEYS)
    )
    turn = (
        func.row_number().over(partition_by=_JOBS.c.api_key_id, order_by=(_JOBS.c.created_at, _JOBS.c.id))
        + func.coalesce(_UNDER_WAY.c.jobs, 0)
    ).label("turn")
    waiting = (
        select(_JOBS.c.id, turn)
        .select_from(
            _KEYS.join(_JOBS, _JOBS.c.id.in_(firsts)).outerjoin(_UNDER_WAY, _UNDER_WAY.c.api_key_id == _KEYS.c.id)
        )
        .order_by(turn, _JOBS.c.created_at, _JOBS.c.id)
        .limit(bindparam("b_candidates"))
        .cte("waiting")
    )
    return (
        select(*_JOB_COLUMNS)
        .join(waiting, waiting.c.id == _JOBS.c.id)
        .where(_JOBS.c.status == RequestStatus.queued.value)
        .order_by(waiting.c.turn, _JOBS.c.created_at, _JOBS.c.id)
        .limit(bindparam("b_limit"))
    )


_QUEUE = _queue(by_model=False)
_QUEUE_OF_MODELS = _queue(by_model=True)


def _candidates_by_key(by_model: bool) -> Select[Any]:
    """PostgreSQL's candidates: the same turns as `_queue`, from each key's first few queued jobs
    only (a LATERAL join per key, in the order of the index `ix_jobs_queue_by_key`). Returns their
    ids, best turn first; `_LOCK_CANDIDATES` then claims from them."""
    firsts = (
        select(
            _JOBS.c.id,
            _JOBS.c.created_at,
            func.row_number().over(order_by=(_JOBS.c.created_at, _JOBS.c.id)).label("place"),
        )
        .where(_JOBS.c.api_key_id == _KEYS.c.id, *_wanted(by_model))
        .order_by(_JOBS.c.created_at, _JOBS.c.id)
        .limit(bindparam("b_candidates"))
        .lateral("firsts")
    )
    turn = firsts.c.place + func.coalesce(_UNDER_WAY.c.jobs, 0)
    return (
        select(firsts.c.id)
        .select_from(_KEYS.join(firsts, true()).outerjoin(_UNDER_WAY, _UNDER_WAY.c.api_key_id == _KEYS.c.id))
        .order_by(turn, firsts.c.created_at, firsts.c.id)
        .limit(bindparam("b_candidates"))
    )


_CANDIDATES = _candidates_by_key(by_model=False)
_CANDIDATES_OF_MODELS = _candidates_by_key(by_model=True)
# The first `b_limit` of the candidates (`b_ids`, best first) that no other replica is claiming,
# locked and looked up by primary key alone. Whether each is still queued is checked on the locked
# row, in Python (`claim_for_dispatch`): with `status = 'queued'` in this WHERE, statistics that
# still count the queue as nearly empty make PostgreSQL read every queued job through a status
# index and test each against the whole id list. A candidate another replica took in the meantime
# is left out and the batch filled from the next ones.
_IDS = bindparam("b_ids", type_=postgresql.ARRAY(_JOBS.c.id.type))
_LOCK_CANDIDATES = (
    select(*_JOB_COLUMNS)
    .where(_JOBS.c.id == func.any(_IDS))
    .order_by(func.array_position(_IDS, _JOBS.c.id))
    .limit(bindparam("b_limit"))
    .with_for_update(of=_JOBS, skip_locked=True)
)
# What each miner holds of ours, per kind (`Store.active_counts`), once per dispatch round.
_HELD = (
    select(_JOBS.c.miner_hotkey, _JOBS.c.kind, func.count())
    .where(_one_of(_JOBS.c.status, ACTIVE), _JOBS.c.miner_hotkey.is_not(None))
    .group_by(_JOBS.c.miner_hotkey, _JOBS.c.kind)
)
# What a claim sets on each job, as one executemany UPDATE (bound as b_<column>).
_CLAIMED = ("status", "attempts", "dispatched_at", "dispatch_deadline", "miner_hotkey", "miner_uid", "started_at",
            "updated_at")  # fmt: skip
_CLAIM = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("b_id"), _JOBS.c.status == RequestStatus.queued.value)
    .values({name: bindparam(f"b_{name}") for name in _CLAIMED})
)
# A job's audit verdict is stored: it is no longer owed (`Store.add_audit`).
_AUDIT_PAID = update(_JOBS).where(_JOBS.c.id == bindparam("b_id"), _OWED).values(audit_owed=False)
# Deliveries the webhook sender owes: finished requests whose webhook is pending and due.
_WEBHOOK_DUE = (
    select(*_JOB_COLUMNS)
    .where(
        _JOBS.c.webhook_state == "pending",
        _one_of(_JOBS.c.status, TERMINAL),
        or_(_JOBS.c.webhook_next_at.is_(None), _JOBS.c.webhook_next_at <= bindparam("b_now")),
    )
    .order_by(_JOBS.c.finished_at)
    .limit(bindparam("b_limit"))
)

# claim_for_dispatch's miner choice: (job, earlier attempts per hotkey) -> (hotkey, uid), or None.
AssignMiner = Callable[[Job, Counter[str]], tuple[str, int | None] | None]
# submit_job's job builder: the admitted key -> the new job's row (`job_row`), or the refusal.
BuildJob = Callable[[ApiKey], Mapping[str, Any]]

# Columns a transition may set besides the status (the id, owner and request never change).
_TRANSITION_FIELDS = frozenset(_JOBS.columns.keys()) - {"id", "api_key_id", "kind", "payload", "status"}
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
class SweepResult:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Success:
    """What a succeeded attempt stores on its job (`Store.succeed`)."""

    result_sha256: str
    result_bytes: int
    fingerprint: str | None
    timings: dict[str, Any]
    # A training result: the LoRA to register for the job's key, in the same transaction.
    lora: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class _Refused:
    error: OrchestratorError


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


def job_row(
    api_key_id: str,
    kind: str,
    payload: Mapping[str, Any],
    deadline: datetime,
    attempt_timeout_s: float,
    *,
    model: str = DEFAULT_MODEL,
    webhook_url: str | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    audit: bool = False,
    job_id: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """A new queued job's row, for `Store.insert_jobs` and `Store.submit_job`."""
    if not attempt_timeout_s > 0:
        raise ValueError("attempt_timeout_s must be positive")
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    now = now or utcnow()
    return {column.key: None for column in _JOB_COLUMNS} | {
        "id": job_id or f"req_{uuid.uuid4().hex}",
        "api_key_id": api_key_id,
        "kind": str(kind),
        "model": model,
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
        "audit_owed": audit,
        **usage.job_units(kind, payload).columns(),
    }


class Store:
    def __init__(self, url_or_engine: str | URL | Engine) -> None:
        self.engine = url_or_engine if isinstance(url_or_engine, Engine) else make_engine(url_or_engine)
        self.dialect = self.engine.dialect.name
        # Reads: single statements need no BEGIN and COMMIT on PostgreSQL (two round trips of three).
        reader = (
            self.engine.execution_options(isolation_level="AUTOCOMMIT") if self.dialect == "postgresql" else self.engine
        )
        # expire_on_commit=False: returned rows stay readable after their session is gone.
        self._read = sessionmaker(reader, expire_on_commit=False)
        self._reader = reader
        self.writer = Writer(self.engine.execution_options(**{WRITE_OPTION: True}).begin)

    @classmethod
    def open(cls, url: str | URL, migrate: bool = True, *, default_model: str | None = None) -> Store:
        """A store on `url`, its schema brought up to date first (the usual way to start).
        `default_model`: the orchestrator's, for rows older than per-job models (`db.upgrade`)."""
        store = cls(url)
        if migrate:
            upgrade(store.engine, default_model=default_model)
        return store

    def close(self) -> None:
        self.writer.close()
        self.engine.dispose()

    async def call(self, method: Callable[..., T], *args: Any, lock_key: str = "", **kwargs: Any) -> T:
        """For an event loop: run `method(*args, **kwargs)`, a method of this store (or a function
        that calls at most one), on the writer thread; returns once its write has committed.
        `lock_key` names the row the write may wait to lock (a job id): the writer orders a group's
        calls by it, so replicas' groups never deadlock each other."""

        def run() -> T | _Refused:
            try:
                return method(*args, **kwargs)
            except OrchestratorError as refused:
                # A refusal is this call's answer, not a failed write: the group commits.
                return _Refused(refused)

        outcome = await self.writer.submit(run, lock_key)
        if isinstance(outcome, _Refused):
            raise outcome.error
        return outcome

    def _write(self, fn: Callable[[Connection], T], lock_key: str = "") -> T:
        """`fn(connection)` as this call's transaction (see the module docstring)."""
        try:
            return self.writer.run(fn, lock_key)
        except DBAPIError as exc:
            if is_illegal_transition(exc):
                raise IllegalTransition(str(exc.orig).splitlines()[0]) from exc
            raise

    # ---- API keys ---------------------------------------------------------------------------

    def create_api_key(
        self, name: str, rate_limit_per_minute: int = DEFAULT_RATE_LIMIT_PER_MINUTE, now: datetime | None = None
    ) -> NewApiKey:
        if not name.strip() or not name.isprintable():
            # isprintable: one line, no control characters (PostgreSQL takes no NUL in text).
            raise ValueError("an API key needs a name: one line of printable text")
        if rate_limit_per_minute < 1:
            raise ValueError("rate_limit_per_minute must be at least 1")
        short_id = secrets.token_hex(8)
        secret = f"{KEY_PREFIX}{short_id}_{secrets.token_urlsafe(32)}"
        row = {
            "id": f"key_{short_id}",
            "name": name.strip(),
            "key_hash": hash_secret(secret),
            # Standard Webhooks secret format: "whsec_" + base64 of the HMAC key bytes.
            "webhook_secret": "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
            "rate_limit_per_minute": rate_limit_per_minute,
            "created_at": now or utcnow(),
            "revoked_at": None,
        }
        self._write(lambda conn: conn.execute(insert(_KEYS), row))
        return NewApiKey(key=ApiKey(**row), secret=secret)

    def list_api_keys(self, include_revoked: bool = True) -> list[ApiKey]:
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        with self._read() as session:
            return list(session.scalars(query))

    def get_api_key(self, key_id: str) -> ApiKey | None:
        return self._by_id(ApiKey, key_id)

    def revoke_api_key(self, key_id: str, now: datetime | None = None) -> bool:
        """True when this call revoked the key, False when it was already revoked."""
        revoke = (
            update(_KEYS).where(_KEYS.c.id == key_id, _KEYS.c.revoked_at.is_(None)).values(revoked_at=now or utcnow())
        )

        def write(conn: Connection) -> bool:
            if conn.execute(revoke).rowcount == 1:
                return True
            if conn.scalar(select(_KEYS.c.id).where(_KEYS.c.id == key_id)) is None:
                raise UnknownApiKey(key_id)
            return False

        return self._write(write)

    def key_for_secret(self, secret: str) -> ApiKey | None:
        """The live key whose secret this is, or None; counts no request (for local tools)."""
        key_id = _key_id(secret)
        return _live(secret, self.get_api_key(key_id)) if key_id else None

    def set_api_key_quota(self, key_id: str, quota: usage.Quota | None) -> ApiKey:
        """Replace a key's quota (None: unlimited); the key as it now is. Takes effect at the
        key's next submission, on every replica."""
        statement = usage.set_quota_statement(key_id, quota)

        def write(conn: Connection) -> None:
            if conn.execute(statement).rowcount != 1:
                raise UnknownApiKey(key_id)

        self._write(write)
        key = self.get_api_key(key_id)
        assert key is not None
        return key

    def key_usage(self, key: ApiKey, days: int, now: datetime | None = None) -> dict[str, Any]:
        """A key's metered units per UTC day and its quota (`usage.usage_report`)."""
        with self._reader.connect() as conn:
            return usage.usage_report(conn, key.id, usage.quota_of(key.quota), days, now or utcnow())

    def admit(self, secret: str | None, now: datetime | None = None) -> ApiKey:
        """The live key whose secret this is, with this request counted against its per-minute
        limit; `Unauthorized` or `RateLimited` otherwise. Every authenticated call counts."""
        admitted = self._write(lambda conn: _admit(conn, secret, now or utcnow()))
        if isinstance(admitted, OrchestratorError):
            raise admitted
        return admitted

    # ---- jobs -------------------------------------------------------------------------------

    def submit_job(self, secret: str | None, build: BuildJob, now: datetime | None = None) -> Job | OrchestratorError:
        """Admit the caller (as `admit`) and insert the job `build(key)` describes, in one
        transaction. A refusal (of the key, or by `build`) is returned, not raised: the request
        was still counted against the key's limit."""
        now = now or utcnow()

        def write(conn: Connection) -> Job | OrchestratorError:
            key = _admit(conn, secret, now)
            if isinstance(key, OrchestratorError):
                return key
            try:
                row = build(key)
            except OrchestratorError as refused:
                return refused
            over_quota = usage.refusal(conn, key.id, usage.row_units(row), now, key.quota)
            if over_quota is not None:
                return over_quota
            conn.execute(_INSERT_JOB, [row])
            return detached(Job, row)

        return self._write(write)

    def insert_jobs(self, rows: Sequence[Mapping[str, Any]]) -> list[Job]:
        """New queued jobs from `job_row`s, in one statement; `errors.QuotaExceeded` (nothing
        inserted) when a key's quota has no room for them."""

        def write(conn: Connection) -> QuotaExceeded | None:
            # Checked as of their submission (the rows' time), as `submit_job` does.
            over_quota = usage.check_rows(conn, rows, max(row["created_at"] for row in rows))
            if over_quota is None:
                conn.execute(_INSERT_JOB, list(rows))
            return over_quota

        if rows and (refused := self._write(write)) is not None:
            raise refused
        return [detached(Job, row) for row in rows]

    def get_job(self, job_id: str, api_key_id: str) -> Job | None:
        """The job if it belongs to this key; a client never learns that another key's job exists."""
        job = self._by_id(Job, job_id)
        return job if job is not None and job.api_key_id == api_key_id else None

    def load_job(self, job_id: str) -> Job | None:
        """Any job by id, for the orchestrator itself (callbacks, audits); never for client requests."""
        return self._by_id(Job, job_id)

    def _by_id(self, model: type[M], key: str) -> M | None:
        """One row by primary key, read with a prepared Core statement: on the path of every
        request and callback, where an ORM session's get costs three times as much."""
        with self._reader.connect() as conn:
            row = conn.execute(_by_id_statement(model), {"b_id": key}).first()
        return None if row is None else detached(model, row._mapping)

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
        after: tuple[datetime, str] | None = None,
        limit: int = 50,
    ) -> list[Job]:
        """A key's jobs, newest first; `after` (a (created_at, id) a page ended at) continues
        strictly after it in this order."""
        query = select(Job).where(Job.api_key_id == api_key_id)
        if status is not None:
            query = query.where(Job.status == RequestStatus(status).value)
        if after is not None:
            query = query.where(_older_than(Job.created_at, Job.id, *after))
        query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
        with self._read() as session:
            return list(session.scalars(query))

    def queue_position(self, job: Job, kinds: Collection[str], now: datetime | None = None) -> int:
        """A queued job's place in line among queued jobs of `kinds` (its miner lane's) that still
        have time: 1 + those created before it. Oldest first, as an estimate: the dispatcher also
        takes turns between keys, so another key's flood does not add to this job's wait."""
        ahead = (
            select(func.count())
            .select_from(_JOBS)
            .where(
                _JOBS.c.status == RequestStatus.queued.value,
                _JOBS.c.kind.in_(sorted(kinds)),
                _JOBS.c.deadline > (now or utcnow()),
                _older_than(_JOBS.c.created_at, _JOBS.c.id, job.created_at, job.id),
            )
        )
        with self._reader.connect() as conn:
            return 1 + int(conn.execute(ahead).scalar_one())

    def record_progress(
        self, job_id: str, miner_hotkey: str, attempt: int, progress: Mapping[str, Any], now: datetime | None = None
    ) -> bool:
        """Keep a miner's progress report in the job's `timings` (`{"progress": ...}`, replaced by
        the result's timings when it succeeds) if the job is still active at that miner, in that
        attempt; False otherwise. A report says the job started: a job still `dispatched` (its
        accept not yet recorded) moves to `running`. On PostgreSQL every replica hears of it
        (`progress <id>` on the job events channel), as it hears of status changes."""
        to_running = _transition_op(job_id, RequestStatus.dispatched, RequestStatus.running, now or utcnow())
        statement = (
            update(_JOBS)
            .where(
                _JOBS.c.id == job_id,
                _one_of(_JOBS.c.status, ACTIVE),
                _JOBS.c.miner_hotkey == miner_hotkey,
                _JOBS.c.attempts == attempt,
            )
            .values(timings={"progress": {**progress, "attempt": attempt}})
        )

        def write(conn: Connection) -> bool:
            moved = conn.execute(statement).rowcount == 1
            if moved:
                to_running(conn)
            if moved and self.dialect == "postgresql":
                conn.execute(select(func.pg_notify(JOB_EVENTS_CHANNEL, f"{PROGRESS_EVENT} {job_id}")))
            return moved

        return self._write(write, lock_key=job_id)

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
        api_key_id: str | None = None,
        **fields: Any,
    ) -> bool:
        """Move a job from one of the states `frm` to `to`, setting `fields` with it, if and only if
        it is still in one of those states (and belongs to `api_key_id`, when given). False when it
        was not (another process got there first).

        Timestamps follow the state (dispatched_at, started_at, finished_at) unless given; going back
        to `queued` clears the current miner. Leaving an attempt (re-queue or a terminal state)
        closes the open JobAttempt row with `attempt_outcome` (default: what the new state implies).
        """
        move = _transition_op(
            job_id,
            frm,
            to,
            now or utcnow(),
            attempt_outcome=attempt_outcome,
            attempt_error=attempt_error,
            api_key_id=api_key_id,
            **fields,
        )
        return self._write(move, lock_key=job_id)

    def take_back(
        self, job: Job, reason: str, *, outcome: str, now: datetime | None = None, min_attempt_s: float
    ) -> str | None:
        """Take an active job back from its miner, closing its attempt as `outcome` (see
        `states.NOT_TAKEN` and `states.CLIENTS_DOING`). Returns the new status, or None when the job
        had already moved on.

        Back to the queue while at least `min_attempt_s` are left before the client's deadline and,
        unless the miner never took the job (`NOT_TAKEN`: no attempt used up), attempts are left;
        otherwise `failed`. A job whose own request ended the attempt (`CLIENTS_DOING`) fails at
        once, with an error that tells the client why.
        """
        now = now or utcnow()

        def write(conn: Connection) -> str | None:
            spent = 0 if outcome in NOT_TAKEN | CLIENTS_DOING else _spent_attempts(conn, [job.id])[job.id] + 1
            target, fields = _after_attempt(job, outcome, reason, now, min_attempt_s, spent)
            move = _transition_op(
                job.id,
                ACTIVE,
                target,
                now,
                attempt_outcome=outcome,
                attempt_error=reason,
                attempt=job.attempts,
                **fields,
            )
            return target.value if move(conn) else None

        return self._write(write, lock_key=job.id)

    def succeed(self, job_id: str, success: Success, now: datetime | None = None, *, attempt: int) -> bool:
        """The result of the job's `attempt` is in: store it and move the job to `succeeded`,
        registering its LoRA (`success.lora`) in the same transaction. False when the job had
        already moved on (another copy of the callback, a cancel, a later attempt at another miner)."""
        now = now or utcnow()
        fields = {
            "result_sha256": success.result_sha256,
            "result_blob": success.result_sha256,
            "result_bytes": success.result_bytes,
            "fingerprint": success.fingerprint,
            "timings": success.timings,
            "error": None,
        }
        move = _transition_op(job_id, ACTIVE, RequestStatus.succeeded, now, attempt=attempt, **fields)

        def write(conn: Connection) -> bool:
            if not move(conn):
                return False
            if success.lora is not None:
                # A LoRA is for its training job's model unless the registration says otherwise.
                job_model = select(_JOBS.c.model).where(_JOBS.c.id == job_id).scalar_subquery()
                lora = {"model": job_model, **success.lora, "created_at": now}
                conn.execute(_insert(self.dialect, Lora).values(**lora).on_conflict_do_nothing())
            return True

        return self._write(write, lock_key=job_id)

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
        return self._write(lambda conn: set(conn.scalars(statement)))

    def flag_for_audit(self, job_id: str) -> None:
        """Record that a job was picked for an audit (`flagged_without_verdict` finds it after a restart)."""
        judged = exists().where(Audit.__table__.c.job_id == job_id)
        statement = update(_JOBS).where(_JOBS.c.id == job_id).values(audit=True, audit_owed=~judged)
        self._write(lambda conn: conn.execute(statement), lock_key=job_id)

    def cancel_job(self, job_id: str, api_key_id: str, now: datetime | None = None) -> bool:
        """Cancel a key's own job if it has not finished; False if it had (or is not theirs)."""
        return self.transition(
            job_id, NON_TERMINAL, RequestStatus.canceled, now=now, api_key_id=api_key_id, error="canceled by client"
        )

    def claim_for_dispatch(
        self,
        limit: int,
        now: datetime | None = None,
        kinds: Iterable[str] = (),
        assign: AssignMiner | None = None,
        models: Iterable[str] | None = None,
    ) -> list[Job]:
        """Take up to `limit` queued jobs of these kinds, oldest first, pick a miner for each and
        mark them dispatched: each is returned to exactly one caller, however many processes claim
        at once. Counts the attempt and sets its timeout, capped by the client's deadline.

        `assign(job, tried)` gets the job and how many earlier attempts each hotkey had at it, and
        returns the (hotkey, uid) to send it to, or None to leave the job queued untouched (no
        attempt counted); only jobs that got a miner are returned. Without `assign` (tests of the
        queue alone) jobs are claimed with no miner. With `models`, only jobs for those models."""
        now = now or utcnow()
        params: dict[str, Any] = {
            "b_now": now,
            "b_kinds": [str(kind) for kind in kinds],
            "b_limit": limit,
            "b_candidates": limit * CLAIM_CANDIDATES,
        }
        queue, candidates = _QUEUE, _CANDIDATES
        if models is not None:
            params["b_models"] = list(models)
            queue, candidates = _QUEUE_OF_MODELS, _CANDIDATES_OF_MODELS
            if not params["b_models"]:
                params["b_kinds"] = []

        def queued(conn: Connection) -> Iterable[Any]:
            if not params["b_kinds"]:
                return ()
            if self.dialect != "postgresql":
                return conn.execute(queue, params)
            ids = list(conn.scalars(candidates, params))
            rows: list[Any] = []
            # Locked rows another replica took since the pick are left out, and the batch is
            # filled from the candidates after them; each pass drops the ids it locked.
            while ids and len(rows) < limit:
                locked = list(conn.execute(_LOCK_CANDIDATES, {"b_ids": ids, "b_limit": limit - len(rows)}))
                if not locked:
                    break  # the rest are being claimed by other replicas
                rows += [row for row in locked if row.status == RequestStatus.queued.value]
                seen = {row.id for row in locked}
                ids = [job_id for job_id in ids if job_id not in seen]
            return rows

        def claim(conn: Connection) -> list[Job]:
            # Core statements, one UPDATE and one INSERT for the whole batch: the ORM's unit of work
            # cost more than everything else the dispatcher does per job.
            jobs = [detached(Job, row._mapping) for row in queued(conn)]
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

        return self._write(claim)

    def active_counts(self) -> Counter[tuple[str, str]]:
        """Jobs dispatched or running right now, per (miner hotkey, job kind): what each miner
        holds of ours (every replica's sends included)."""
        with self._reader.connect() as conn:
            return Counter({(hotkey, kind): count for hotkey, kind, count in conn.execute(_HELD)})

    def list_attempts(self, job_id: str | None = None, *, since: datetime | None = None) -> list[JobAttempt]:
        """Attempts in dispatch order: one job's, or every job's (dispatched `since`)."""
        query = select(JobAttempt).order_by(JobAttempt.dispatched_at, JobAttempt.id)
        if job_id is not None:
            query = query.where(JobAttempt.job_id == job_id)
        if since is not None:
            query = query.where(JobAttempt.dispatched_at >= since)
        with self._read() as session:
            return list(session.scalars(query))

    def sweep(self, now: datetime | None = None, min_attempt_s: float = DEFAULT_MIN_ATTEMPT_S) -> SweepResult:
        """Take back jobs whose miner ran out of time, and fail jobs whose client deadline passed.

        A timed-out job goes back to the queue (for another miner; its attempt is recorded as a
        timeout) while it has attempts left and at least `min_attempt_s` before the client's
        deadline; otherwise it fails. When the client's deadline, not the attempt timeout, ended
        the attempt (the miner had less than its full attempt time), the job fails as expired and
        the attempt is recorded as `expired`: not the miner's timeout. Queued jobs past their
        deadline fail. Rows another sweeper holds are skipped, so several orchestrators may sweep
        at once.
        """
        now = now or utcnow()
        stuck_query = (
            select(*_JOB_COLUMNS)
            .where(_one_of(_JOBS.c.status, ACTIVE), _JOBS.c.dispatch_deadline <= now)
            .order_by(_JOBS.c.dispatch_deadline)
            .limit(SWEEP_BATCH)
            .with_for_update(skip_locked=True)
        )
        expired_query = (
            select(_JOBS.c.id)
            .where(_JOBS.c.status == RequestStatus.queued.value, _JOBS.c.deadline <= now)
            .limit(SWEEP_BATCH)
            .with_for_update(skip_locked=True)
        )

        def sweep(conn: Connection) -> SweepResult:
            result = SweepResult()
            stuck = [detached(Job, row._mapping) for row in conn.execute(stuck_query)]
            spent = _spent_attempts(conn, [job.id for job in stuck])
            for job in stuck:
                if cut_short_by_deadline(job):
                    outcome, reason = "expired", f"the client's deadline ended the attempt at {_where(job)}"
                else:
                    outcome, reason = "timeout", f"no result within {job.attempt_timeout_s:g}s from {_where(job)}"
                target, fields = _after_attempt(job, outcome, reason, now, min_attempt_s, spent[job.id] + 1)
                moved = result.requeued if target is RequestStatus.queued else result.failed
                move = _transition_op(
                    job.id, ACTIVE, target, now, attempt_outcome=outcome, attempt_error=reason, **fields
                )
                if move(conn):
                    moved.append(job.id)
            for job_id in list(conn.scalars(expired_query)):
                error = "deadline passed before a miner could finish the job"
                if _transition_op(job_id, RequestStatus.queued, RequestStatus.failed, now, error=error)(conn):
                    result.failed.append(job_id)
            return result

        return self._write(sweep)

    # ---- webhooks ---------------------------------------------------------------------------

    def take_due_webhooks(self, limit: int, lease: timedelta, now: datetime | None = None) -> list[Job]:
        """Finished requests whose webhook delivery is due, each leased (its next try pushed
        `lease` into the future) so no other sender takes it meanwhile; a sender that dies
        mid-delivery leaves it to be retried when the lease ends."""
        now = now or utcnow()
        params = {"b_now": now, "b_limit": limit}
        # Most finished requests have no webhook: look before writing (on SQLite, taking the
        # database's one write lock) to find nothing.
        with self._read() as session:
            if session.execute(_WEBHOOK_DUE, params).first() is None:
                return []

        def take(conn: Connection) -> list[Job]:
            due = conn.execute(_WEBHOOK_DUE.with_for_update(skip_locked=True), params)
            jobs = [detached(Job, row._mapping) for row in due]
            if jobs:
                leased = (
                    update(_JOBS).where(_JOBS.c.id.in_([job.id for job in jobs])).values(webhook_next_at=now + lease)
                )
                conn.execute(leased)
            return jobs

        return self._write(take)

    def record_webhook(
        self, job_id: str, *, attempts: int, state: str, error: str | None, next_at: datetime | None
    ) -> None:
        """The outcome of a delivery attempt: `state` pending (retry at `next_at`), delivered or failed."""
        if state not in WEBHOOK_STATES:
            raise ValueError(f"webhook state must be one of {sorted(WEBHOOK_STATES)}")
        values = {
            "webhook_attempts": attempts,
            "webhook_state": state,
            "webhook_error": error,
            "webhook_next_at": next_at,
        }
        statement = update(_JOBS).where(_JOBS.c.id == job_id).values(values)
        self._write(lambda conn: conn.execute(statement), lock_key=job_id)

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
        upsert = _insert(self.dialect, Miner).values(
            hotkey=hotkey, healthy=False, capacity={}, fingerprints=[], score=0.0, created_at=now, **chain
        )
        statement = upsert.on_conflict_do_update(index_elements=[Miner.hotkey], set_=chain)
        self._write(lambda conn: conn.execute(statement))

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
        statement = update(Miner).where(Miner.hotkey == hotkey).values(values)
        return self._write(lambda conn: conn.execute(statement).rowcount == 1)

    def set_scores(self, scores: Mapping[str, float], now: datetime | None = None) -> None:
        now = now or utcnow()
        table = Miner.__table__
        statement = update(table).where(table.c.hotkey == bindparam("b_hotkey")).values(score=bindparam("b_score"))
        rows = [{"b_hotkey": hotkey, "b_score": score} for hotkey, score in scores.items()]
        if rows:
            self._write(lambda conn: conn.execute(statement.values(updated_at=now), rows))

    def get_miner(self, hotkey: str) -> Miner | None:
        with self._read() as session:
            return session.get(Miner, hotkey)

    def list_miners(self, healthy_only: bool = False) -> list[Miner]:
        query = select(Miner).order_by(Miner.uid, Miner.hotkey)
        if healthy_only:
            query = query.where(Miner.healthy.is_(True))
        with self._read() as session:
            return list(session.scalars(query))

    def listen(self, on_event: Callable[[str, str], None]) -> Listener | None:
        """On PostgreSQL, a started `Listener` calling `on_event(status, job_id)` whenever any
        replica's committed write queues or finishes a job (migration 0004); None on SQLite."""
        if self.dialect != "postgresql":
            return None
        listener = Listener(self.engine.url, on_event)
        listener.start()
        return listener

    def ping(self) -> None:
        """One round trip to the database (readiness checks)."""
        with self._read() as session:
            session.execute(select(1))

    # ---- LoRAs ------------------------------------------------------------------------------

    def get_lora(self, lora_id: str, api_key_id: str) -> Lora | None:
        with self._read() as session:
            return session.scalar(select(Lora).where(Lora.id == lora_id, Lora.api_key_id == api_key_id))

    def list_loras(
        self, api_key_id: str, *, after: tuple[datetime, str] | None = None, limit: int | None = None
    ) -> list[Lora]:
        """A key's LoRAs, newest first (ties by id, descending); `after` as in `list_jobs`."""
        query = select(Lora).where(Lora.api_key_id == api_key_id)
        if after is not None:
            query = query.where(_older_than(Lora.created_at, Lora.id, *after))
        query = query.order_by(Lora.created_at.desc(), Lora.id.desc()).limit(limit)
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
    ) -> Audit | None:
        """Store a job's audit verdict; None when the job has one already (the first stands)."""
        if verdict not in AUDIT_VERDICTS:
            raise ValueError(f"verdict must be one of {sorted(AUDIT_VERDICTS)}")
        row = {
            "job_id": job_id,
            "miner_hotkey": miner_hotkey,
            "verdict": verdict,
            "evidence": dict(evidence or {}),
            "created_at": now or utcnow(),
        }
        statement = _insert(self.dialect, Audit).on_conflict_do_nothing(index_elements=["job_id"]).returning(Audit.id)

        def write(conn: Connection) -> int | None:
            audit_id = conn.execute(statement, row).scalar_one_or_none()
            # Judged, by this verdict or by the one that stood first: owed no longer.
            conn.execute(_AUDIT_PAID, {"b_id": job_id})
            return audit_id

        audit_id = self._write(write, lock_key=job_id)
        return None if audit_id is None else Audit(id=audit_id, **row)

    def flagged_without_verdict(self, limit: int = 10_000) -> list[str]:
        """Jobs picked for an audit that has no verdict yet, oldest first, wherever they were
        picked: the audits leader's work, read from a partial index of just those jobs."""
        query = select(_JOBS.c.id).where(_OWED).order_by(_JOBS.c.updated_at, _JOBS.c.id).limit(limit)
        with self._read() as session:
            return list(session.scalars(query))

    def count_owed_audits(self) -> int:
        """How many picked jobs wait for their verdict (the partial index's size): a number that
        grows while the audits leader falls behind, or while no replica leads audits."""
        query = select(func.count()).select_from(_JOBS).where(_OWED)
        with self._reader.connect() as conn:
            return int(conn.scalar(query) or 0)

    def last_audit_id(self) -> int:
        """The newest audit's id (0: none yet): where `failed_audits_after` starts from."""
        with self._read() as session:
            return int(session.scalar(select(func.max(Audit.id))) or 0)

    def failed_audits_after(self, audit_id: int, limit: int = 1000) -> list[tuple[int, str]]:
        """(id, miner hotkey) of failed audits newer than `audit_id`, oldest first: how replicas
        learn the failures another replica judged (a range scan of the primary key)."""
        query = (
            select(Audit.id, Audit.miner_hotkey)
            .where(Audit.id > audit_id, Audit.verdict == "fail")
            .order_by(Audit.id)
            .limit(limit)
        )
        with self._read() as session:
            return [(int(row.id), row.miner_hotkey) for row in session.execute(query)]

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


class Listener:
    """A thread on its own PostgreSQL connection that LISTENs for job events (`Store.listen`).
    Notifications arrive only after the writing transaction commits. A lost connection is
    reopened; events sent meanwhile are missed, which costs only latency: dispatchers and
    waiters also poll."""

    def __init__(self, url: URL, on_event: Callable[[str, str], None]) -> None:
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._on_event = on_event
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orch-db-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {JOB_EVENTS_CHANNEL}")
                    while not self._stop.is_set():
                        for notify in conn.notifies(timeout=LISTEN_POLL_S):
                            status, _, job_id = notify.payload.partition(" ")
                            self._on_event(status, job_id)
            except Exception:
                log.exception("job event listener lost its connection; reconnecting")
                self._stop.wait(LISTEN_POLL_S)


# ---- statements -----------------------------------------------------------------------------------

_INSERT_JOB = insert(_JOBS)


def _insert(dialect: str, table: Any) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT (the generic one does not)."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def _older_than(created_at: Any, row_id: Any, at: datetime, at_id: str) -> ColumnElement[bool]:
    """Rows after (at, at_id) in newest-first order (a page's continuation), or before it in the
    queue's oldest-first order: two comparisons rather than a row value, which SQLite and
    PostgreSQL both plan on their created_at indexes."""
    return or_(created_at < at, and_(created_at == at, row_id < at_id))


def _admit(conn: Connection, secret: str | None, now: datetime) -> ApiKey | OrchestratorError:
    """`Store.admit` inside a transaction; the refusal is returned, so a group of writes is not
    rolled back and re-run for it (see `writer`)."""
    if secret is None:
        return Unauthorized("missing Authorization: Bearer <API key>")
    key_id = _key_id(secret)
    if key_id is None:
        return Unauthorized("invalid or revoked API key")
    if conn.dialect.name == "postgresql":
        key, requests = _read_and_count(conn, key_id, secret, now)
    else:
        row = conn.execute(_by_id_statement(ApiKey), {"b_id": key_id}).first()
        key = _live(secret, None if row is None else detached(ApiKey, row._mapping))
        requests = None if key is None else _count_request(conn, key.id, now)
    if key is None or requests is None:
        return Unauthorized("invalid or revoked API key")
    if requests > key.rate_limit_per_minute:
        reason = f"rate limit of {key.rate_limit_per_minute} requests per minute reached"
        return RateLimited(reason, _until_next_window(now))
    return key


def _count_request(conn: Connection, api_key_id: str, now: datetime, shard: int | None = None) -> int:
    """Count one request in the key's window for the minute of `now`, on this process's row
    (`shard`: another row, for tests); returns the window's count over every process's rows.

    Fixed windows may let a client burst up to twice its limit across a window boundary: the
    price of a few rows per key per minute, shared by every process on the database. Requests
    that replicas admit at the same instant count each other once committed: a replica does not
    wait for another's uncommitted count (module `db`), so together they may pass the limit by
    what was in flight."""
    params = _window_params(api_key_id, now, shard)
    return _pruned(conn, conn.scalar(_count_statement(conn.dialect.name), params), params)


def _read_and_count(conn: Connection, key_id: str, secret: str, now: datetime) -> tuple[ApiKey | None, int | None]:
    """PostgreSQL's admission in one round trip, on the path of every request: the key, and the
    request counted as `_count_request` does, only when the key is live and this is its secret.
    (None, None) for a key that is not."""
    params = _window_params(key_id, now) | {"b_hash": hash_secret(secret)}
    row = conn.execute(_ADMIT_POSTGRES, params).first()
    if row is None:
        return None, None
    values = dict(row._mapping)
    requests = values.pop("requests")
    key = _live(secret, detached(ApiKey, values))
    return key, None if requests is None else _pruned(conn, requests, params)


def _pruned(conn: Connection, total: int, params: Mapping[str, Any]) -> int:
    """`total`, the window's count after this request; the first request of a new window also
    deletes the key's older windows, which will never be read again."""
    if total == 1:
        conn.execute(_PRUNE_WINDOWS, params)
    return total


_RATES = RateWindow.__table__
_PRUNE_WINDOWS = _RATES.delete().where(
    _RATES.c.api_key_id == bindparam("b_key"), _RATES.c.window_start < bindparam("b_window")
)


def _window_params(api_key_id: str, now: datetime, shard: int | None = None) -> dict[str, Any]:
    """The key, the window of `now` and the process's row (`shard`: another, for tests)."""
    shard = process_shard() if shard is None else shard
    return {"b_key": api_key_id, "b_window": now.replace(second=0, microsecond=0), "b_shard": shard}


_WINDOW_KEY = bindparam("b_key", type_=_RATES.c.api_key_id.type)
_WINDOW = bindparam("b_window", type_=_RATES.c.window_start.type)
_SHARD = bindparam("b_shard", type_=_RATES.c.shard.type)


def _others_count() -> Any:
    """The window's count on the other processes' rows."""
    others = _RATES.alias("others")
    return (
        select(func.coalesce(func.sum(others.c.count), 0))
        .where(others.c.api_key_id == _WINDOW_KEY, others.c.window_start == _WINDOW, others.c.shard != _SHARD)
        .scalar_subquery()
    )


def _counted(upsert: Any) -> Any:
    """`upsert` (a dialect's INSERT of one request on this process's row) adding to the row
    already there."""
    return upsert.on_conflict_do_update(
        index_elements=[_RATES.c.api_key_id, _RATES.c.window_start, _RATES.c.shard],
        set_={"count": _RATES.c.count + 1},
    )


@cache
def _count_statement(dialect: str) -> Any:
    """The upsert counting a request on this process's row, returning the window's count with
    the other processes' rows added (one statement, on the path of every request), built once per
    dialect."""
    upsert = _insert(dialect, _RATES).values(api_key_id=_WINDOW_KEY, window_start=_WINDOW, shard=_SHARD, count=1)
    return _counted(upsert).returning(_RATES.c.count + _others_count())


def _admit_postgres() -> Any:
    """The key's row with a `requests` column: the window's count after this request, counted
    (as `_count_statement` counts) only when the key is live and `b_hash` is its secret's hash;
    NULL otherwise. A data-modifying CTE, which SQLite does not have."""
    key = select(*_KEYS.columns).where(_KEYS.c.id == _WINDOW_KEY).cte("key")
    live = select(key.c.id, _WINDOW, _SHARD, literal(1)).where(
        key.c.key_hash == bindparam("b_hash"), key.c.revoked_at.is_(None)
    )
    upsert = postgresql.insert(_RATES).from_select(["api_key_id", "window_start", "shard", "count"], live)
    counted = _counted(upsert).returning(_RATES.c.count).cte("counted")
    requests = select(counted.c.count).scalar_subquery() + _others_count()
    return select(*key.columns, requests.label("requests"))


_ADMIT_POSTGRES = _admit_postgres()


def _transition_op(
    job_id: str,
    frm: RequestStatus | str | Iterable[RequestStatus | str],
    to: RequestStatus | str,
    now: datetime,
    *,
    attempt_outcome: str | None = None,
    attempt_error: str | None = None,
    api_key_id: str | None = None,
    attempt: int | None = None,
    **fields: Any,
) -> Callable[[Connection], bool]:
    """The one way a job's status changes: a compare-and-set UPDATE (see `Store.transition`),
    as a function of the transaction's connection. With `attempt`, only while the job is still
    on that attempt: what a miner reports about its attempt must not land on the next one."""
    sources = {RequestStatus(frm)} if isinstance(frm, str) else {RequestStatus(s) for s in frm}
    target = RequestStatus(to)
    illegal = sorted(s.value for s in sources if not can_transition(s, target))
    if not sources or illegal:
        raise IllegalTransition(f"{', '.join(illegal) or '(nothing)'} -> {target.value} is not a job transition")
    unknown = set(fields) - _TRANSITION_FIELDS
    if unknown:
        raise TypeError(f"transition cannot set {', '.join(sorted(unknown))}")
    values = {**_implied_fields(target, now), **fields, "status": target.value, "updated_at": now}
    statement_key = (
        tuple(sorted(s.value for s in sources)),
        tuple(sorted(values)),
        api_key_id is not None,
        attempt is not None,
    )
    params = {"b_id": job_id} | {f"b_{name}": value for name, value in values.items()}
    if api_key_id is not None:
        params["b_api_key_id"] = api_key_id
    if attempt is not None:
        params["b_on_attempt"] = attempt
    closes = target in _ATTEMPT_OUTCOME
    outcome = attempt_outcome or _ATTEMPT_OUTCOME.get(target, "")
    # Metered in the transaction that finishes the job: exact on any number of replicas.
    metered = target is RequestStatus.succeeded

    def move(conn: Connection) -> bool:
        if closes and conn.dialect.name == "postgresql":
            both = _transition_closing_statement(*statement_key, metered)
            both_params = params | _attempt_params(job_id, outcome, attempt_error, now)
            if metered:
                both_params |= usage.metering_params(now)
            return conn.scalar(both, both_params) == 1
        if conn.execute(_transition_statement(*statement_key), params).rowcount != 1:
            return False
        if closes:
            _close_attempt(conn, job_id, outcome, attempt_error, now)
        if metered:
            usage.record_success(conn, job_id, now)
        return True

    return move


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


def cut_short_by_deadline(job: Job) -> bool:
    """True when the client's deadline left the job's current miner less than its full attempt
    timeout: then a miner that ran out of time ran out of the client's time, not its own."""
    if job.dispatched_at is None:
        return False
    return job.deadline < job.dispatched_at + timedelta(seconds=job.attempt_timeout_s)


def _where(job: Job) -> str:
    if not job.miner_hotkey:
        return "before a miner was assigned"
    return f"miner {job.miner_uid if job.miner_uid is not None else job.miner_hotkey}"


def _after_attempt(
    job: Job, outcome: str, reason: str, now: datetime, min_attempt_s: float, spent: int
) -> tuple[RequestStatus, dict[str, Any]]:
    """Where a job goes when its current attempt ends as `outcome` (not a success), and the error
    the client sees if that is `failed`. `spent`: the attempts used up, this one included."""
    left = (job.deadline - now).total_seconds()
    has_time = left > 0 and left >= min_attempt_s
    if outcome == "bad_input":
        error = f"the request's input cannot be used: {reason}"
    elif outcome == "expired":
        error = f"deadline passed before the job could finish ({reason})"
    elif outcome in NOT_TAKEN:
        if has_time:
            return RequestStatus.queued, {}
        error = f"deadline passed before a miner could take the job (the last: {reason})"
    elif spent < job.max_attempts and has_time:
        return RequestStatus.queued, {}
    else:
        error = f"attempt {spent} of {job.max_attempts} failed ({reason}); no attempts or time left"
    return RequestStatus.failed, {"error": error[:2000]}


def _spent_attempts(conn: Connection, job_ids: list[str]) -> Counter[str]:
    """Per job, its finished attempts that used up one of its `max_attempts` (`states.NOT_TAKEN`
    ones did not). The open attempt is not among them."""
    spent: Counter[str] = Counter()
    if job_ids:
        query = (
            select(_ATTEMPTS.c.job_id, func.count())
            .where(
                _ATTEMPTS.c.job_id.in_(job_ids),
                _ATTEMPTS.c.outcome.is_not(None),
                _ATTEMPTS.c.outcome.not_in(sorted(NOT_TAKEN)),
            )
            .group_by(_ATTEMPTS.c.job_id)
        )
        spent.update(dict(conn.execute(query).tuples().all()))
    return spent


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
def _transition_statement(sources: tuple[str, ...], names: tuple[str, ...], owned: bool, on_attempt: bool) -> Update:
    """`UPDATE jobs SET <names> WHERE id = :b_id AND status IN <sources> [AND api_key_id = :b_api_key_id]
    [AND attempts = :b_on_attempt]`, built once per shape (a handful in all): building and keying a
    statement costs more than running it."""
    where = [_JOBS.c.id == bindparam("b_id"), _one_of(_JOBS.c.status, sources)]
    if owned:
        where.append(_JOBS.c.api_key_id == bindparam("b_api_key_id"))
    if on_attempt:
        where.append(_JOBS.c.attempts == bindparam("b_on_attempt"))
    return update(_JOBS).where(*where).values({name: bindparam(f"b_{name}") for name in names})


# Closing a job's open attempt (there is at most one: every move out of an attempt closes it).
def _closing_attempts(jobs: ColumnElement[bool], latency: ColumnElement[float]) -> Update:
    values: dict[str, Any] = {
        "outcome": bindparam("b_attempt_outcome"),
        "error": bindparam("b_attempt_error"),
        "finished_at": bindparam("b_attempt_finished_at", type_=_ATTEMPTS.c.finished_at.type),
        "latency_s": latency,
    }
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
_CLOSE_ATTEMPTS_SQLITE = _closing_attempts(_THIS_JOB, bindparam("b_latency_s"))
_OPEN_ATTEMPT = select(_ATTEMPTS.c.dispatched_at).where(_THIS_JOB, _ATTEMPTS.c.outcome.is_(None))


@lru_cache(maxsize=256)
def _transition_closing_statement(
    sources: tuple[str, ...], names: tuple[str, ...], owned: bool, on_attempt: bool, metered: bool
) -> Select[Any]:
    """PostgreSQL: `_transition_statement`, the close of the job's attempt and, for a success,
    its metering as one statement (data-modifying CTEs), which counts the jobs moved (0 or 1): on
    the path of every callback."""
    moved = (
        _transition_statement(sources, names, owned, on_attempt)
        .returning(_JOBS.c.id, *usage.METERED_COLUMNS)
        .cte("moved")
    )
    closed = _closing_attempts(_ATTEMPTS.c.job_id.in_(select(moved.c.id)), _PG_LATENCY).cte("closed")
    statement = select(func.count()).select_from(moved).add_cte(closed)
    if metered:
        statement = statement.add_cte(usage.metering("postgresql", moved).cte("metered"))
    return statement


def _attempt_params(job_id: str, outcome: str, error: str | None, now: datetime) -> dict[str, Any]:
    return {"b_job_id": job_id, "b_attempt_outcome": outcome, "b_attempt_error": error, "b_attempt_finished_at": now}


def _close_attempt(conn: Connection, job_id: str, outcome: str, error: str | None, now: datetime) -> None:
    """SQLite's close of the job's open attempt (PostgreSQL's is part of `_transition_closing_statement`)."""
    params = _attempt_params(job_id, outcome, error, now)
    dispatched_at = conn.scalar(_OPEN_ATTEMPT, params)
    if dispatched_at is not None:
        latency = max(0.0, (now - dispatched_at).total_seconds())
        conn.execute(_CLOSE_ATTEMPTS_SQLITE, params | {"b_latency_s": latency})
