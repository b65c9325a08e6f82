"""The orchestrator's tables as SQLAlchemy 2 typed models. Queries live in `store`; the schema
changes only through migrations in `migrations/versions` (a test checks that both agree).

Times are stored in UTC and always come back timezone-aware, on SQLite as on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Any, ClassVar, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    true,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, configure_mappers, mapped_column
from sqlalchemy.types import TypeDecorator

from dippy_studio.orchestrator.states import RequestStatus


class UTCDateTime(TypeDecorator[datetime]):
    """An aware datetime in, an aware UTC datetime out. SQLite has no time zones, so it stores
    naive UTC; a naive value coming in is a bug we refuse rather than guess at."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass a timezone-aware one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


_Model = TypeVar("_Model", bound="Base")


def detached(model: type[_Model], values: Mapping[str, Any]) -> _Model:
    """A row as an instance of `model` outside any session, for reading. Its values go straight
    into the instance's dict: the constructor fires an attribute event per column, the largest
    single cost of building rows on the submit, claim and callback paths (bench/README.md,
    throughput). Never add one to a session: it carries no pending changes to write."""
    instance = model.__mapper__.class_manager.new_instance()
    instance.__dict__.update(values)
    return instance


# Stable constraint names, so migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


# The model (an engine profile name, `protocol.limits.PROFILE_LIMITS`) an orchestrator serves when
# it is configured with no other, and the one rows written before migration 0006 belong to when
# nothing says otherwise.
DEFAULT_MODEL = "tiny"

_STATUSES = ", ".join(f"'{s.value}'" for s in RequestStatus)


class ApiKey(Base):
    """A client's API key. The secret (`dsk_<id hex>_<random>`) is shown once at creation; only its
    sha256 is kept. The secret has 256 random bits, so a fast hash is enough (nothing to brute-force).

    `webhook_secret` is kept in plain text on purpose: Standard Webhooks signatures are HMACs, and
    the server needs the secret itself to sign each delivery. Protect the database accordingly.
    """

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    webhook_secret: Mapped[str] = mapped_column(String(200))
    rate_limit_per_minute: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    # Per-day and per-month limits on metered units (`usage.Quota`; migration 0005); None: unlimited.
    quota: Mapped[dict[str, Any] | None]


class Job(Base):
    """One client request (`req_<uuid hex>`): an inference or a training job, and where it stands."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"status IN ({_STATUSES})", name="status"),
        # The dispatcher's queue scan and the sweeper's timeout scan.
        Index(None, "status", "created_at"),
        Index(None, "status", "dispatch_deadline"),
        Index(None, "api_key_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    kind: Mapped[str] = mapped_column(String(16))
    # The model the job is for (a profile name): only miners serving it get it, and its audits
    # re-run on a reference of it (migration 0006).
    model: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    # The client's deadline for the whole request, across every attempt.
    deadline: Mapped[datetime]
    # Dispatches so far (counted when claimed, so a dispatcher that dies mid-send still uses one up).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    # How long one miner gets before the sweeper takes the job back.
    attempt_timeout_s: Mapped[float] = mapped_column(Float)
    # The current attempt: cleared when the job goes back to the queue.
    miner_hotkey: Mapped[str | None] = mapped_column(String(64))
    miner_uid: Mapped[int | None] = mapped_column(Integer)
    dispatched_at: Mapped[datetime | None]
    dispatch_deadline: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # What the miner claimed, and the blob-store key once the bytes were checked and stored.
    result_sha256: Mapped[str | None] = mapped_column(String(64))
    result_blob: Mapped[str | None] = mapped_column(String(64))
    result_bytes: Mapped[int | None] = mapped_column(Integer)
    fingerprint: Mapped[str | None] = mapped_column(String(128))
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    # none | pending | delivered | failed
    webhook_state: Mapped[str] = mapped_column(String(16), default="none")
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Picked for an audit by re-run; verdicts live in `audits`.
    audit: Mapped[bool] = mapped_column(Boolean, default=False)
    # When the next webhook delivery is due (also a lease while one is in flight; migration 0002).
    webhook_next_at: Mapped[datetime | None]
    webhook_error: Mapped[str | None] = mapped_column(Text)
    # What the job is metered as once it succeeds, fixed when it is queued (`usage.job_units`;
    # migration 0005): quotas count a key's unfinished jobs at these.
    units_images: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    units_megapixel_steps: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    units_training_steps: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Picked for an audit and not judged yet (migration 0008): what the audits leader takes up.
    audit_owed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


# The webhook sender's scan for due deliveries (migration 0002).
Index("ix_jobs_webhook_state_webhook_next_at", Job.webhook_state, Job.webhook_next_at)
# A key's unfinished jobs, for its quota check (migration 0005), and a key's queue in order, for
# the claim's turns on PostgreSQL (`store._candidates_by_key`; migration 0010).
Index("ix_jobs_queue_by_key", Job.api_key_id, Job.status, Job.created_at, Job.id)
# Owed audits, oldest first (migration 0008). Partial: it holds only the few jobs still owed, so
# the audits leader's look at every turn costs the same after years of history as on day one.
_OWED = Job.audit_owed.is_(true())
Index("ix_jobs_audit_owed", Job.updated_at, Job.id, sqlite_where=_OWED, postgresql_where=_OWED)


class JobTransition(Base):
    """One status change the state machine allows (`states.TRANSITIONS`), as rows the database's
    triggers on `jobs` consult (migration 0003). Written by migrations only; reference data, so
    nothing that empties tables should empty this one."""

    __tablename__ = "job_transitions"

    from_status: Mapped[str] = mapped_column(String(16), primary_key=True)
    to_status: Mapped[str] = mapped_column(String(16), primary_key=True)


class JobAttempt(Base):
    """One dispatch of a job to one miner. The dispatcher uses it to avoid retrying a miner that
    already failed the job, and the scorer to see latencies and failures."""

    __tablename__ = "job_attempts"
    __table_args__ = (UniqueConstraint("job_id", "attempt"), Index(None, "miner_hotkey", "dispatched_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    miner_hotkey: Mapped[str] = mapped_column(String(64))
    miner_uid: Mapped[int | None] = mapped_column(Integer)
    dispatched_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    # None while open; then how it ended (the outcomes are listed in `states`, above NOT_TAKEN).
    outcome: Mapped[str | None] = mapped_column(String(16))
    latency_s: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)


class Miner(Base):
    """A miner as the orchestrator last saw it on the metagraph and through health probes."""

    __tablename__ = "miners"

    hotkey: Mapped[str] = mapped_column(String(64), primary_key=True)
    uid: Mapped[int] = mapped_column(Integer)
    coldkey: Mapped[str | None] = mapped_column(String(64))
    endpoint: Mapped[str | None] = mapped_column(String(2048))
    stake: Mapped[float] = mapped_column(Float, default=0.0)
    healthy: Mapped[bool] = mapped_column(Boolean, default=False)
    last_probe_at: Mapped[datetime | None]
    capacity: Mapped[dict[str, Any]] = mapped_column(default=dict)
    fingerprints: Mapped[list[Any]] = mapped_column(default=list)
    score: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Lora(Base):
    """A trained LoRA a client can name in later inference requests. The file is the blob whose
    name is `sha256` (`BlobStore.local_path(sha256)`); no path is stored, so the data dir can move."""

    __tablename__ = "loras"
    __table_args__ = (Index(None, "api_key_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64))
    trigger_word: Mapped[str] = mapped_column(String(64), default="")
    rank: Mapped[int] = mapped_column(Integer)
    # The model it was trained for: the only one it may be used with (migration 0006).
    model: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    source_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))


class Audit(Base):
    """The verdict of re-running one job on a reference engine, with the evidence behind it."""

    __tablename__ = "audits"
    # One verdict per job (migration 0007): a second one is never stored.
    __table_args__ = (Index(None, "miner_hotkey", "created_at"), Index(None, "job_id", unique=True))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    miner_hotkey: Mapped[str] = mapped_column(String(64))
    # pass | fail | inconclusive
    verdict: Mapped[str] = mapped_column(String(16))
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]


class UsageDay(Base):
    """The units of a key's succeeded jobs on one UTC day, counted by one orchestrator process
    (`shard`) in the transaction that marks each job succeeded (`usage.record_success`; migrations
    0005 and 0009). A day's usage is the sum over its shards."""

    __tablename__ = "usage_days"

    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False, server_default="0")
    images: Mapped[int] = mapped_column(Integer)
    megapixel_steps: Mapped[float] = mapped_column(Float)
    training_steps: Mapped[int] = mapped_column(Integer)


class RateWindow(Base):
    """Requests per API key per one-minute window: a fixed-window counter that every orchestrator
    process shares through the database, one row per process (`shard`; the count is their sum).
    Old windows are pruned as new ones start."""

    __tablename__ = "rate_windows"

    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    window_start: Mapped[datetime] = mapped_column(primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False, server_default="0")
    count: Mapped[int] = mapped_column(Integer)


# `detached` builds instances without the constructor, whose first call is what configures the
# mappers (and so the attributes' loaders): configure them now that every model is defined, or a
# process whose first row comes through `detached` could not read its attributes.
configure_mappers()
