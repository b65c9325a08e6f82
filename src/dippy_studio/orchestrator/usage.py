"""Metering and quotas per API key.

Units: `images` (succeeded image jobs of any task), `megapixel_steps` (width * height / 1e6 *
steps of each succeeded image job, summed) and `training_steps` (the steps each succeeded LoRA job
was asked for: the request's `steps`, as written into its payload). Requested, not reported:
a miner's own count of the steps it ran is the word of the party paid for the job, so the bill
follows what the client asked for and the result was checked against.

Exact across replicas, with no counter in any process's memory:

- A job's units are fixed when it is queued (`job_units`, in the row: `jobs.units_*`).
- The transaction that marks a job succeeded adds its units to the key's row for that UTC day
  (`usage_days`, `record_success`). A day's usage is final once the day is over.
- Each orchestrator process counts into rows of its own (`usage_days.shard`, `db.process_shard`),
  and reads sum them, so replicas finishing jobs for one key never wait for each other's row.
- A submission is checked against the key's quota in the transaction that inserts it
  (`refusal`): the units of the period so far, plus those of the key's unfinished jobs (they may
  still succeed), plus the new job's, must stay within every limit, else `QuotaExceeded` (402).
  Unfinished jobs count against the period in which they finish, which keeps the sum exact across
  midnight. On PostgreSQL the check first locks the key's row, so replicas admitting for one key
  take turns and cannot both take its last units; SQLite has one writer at a time anyway. The
  sums are one statement, so a job that succeeds meanwhile is seen either unfinished or counted,
  never neither. Keys without a quota pay nothing for any of this at submission.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import (
    ColumnElement,
    Connection,
    FromClause,
    Insert,
    bindparam,
    func,
    literal,
    null,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from dippy_studio.orchestrator.db import process_shard
from dippy_studio.orchestrator.errors import QuotaExceeded
from dippy_studio.orchestrator.models import ApiKey, Job, UsageDay
from dippy_studio.orchestrator.states import NON_TERMINAL

UNITS = ("images", "megapixel_steps", "training_steps")
PERIODS = ("day", "month")
MAX_DAYS = 366
# Sums of floats: a limit reached exactly must not read as crossed by a rounding error.
_EPSILON = 1e-9

_JOBS = Job.__table__
_DAYS = UsageDay.__table__
_KEYS = ApiKey.__table__


class Limits(BaseModel):
    """Limits on one period's units; None (or left out): unlimited."""

    model_config = ConfigDict(extra="forbid")

    images: int | None = Field(default=None, ge=0)
    megapixel_steps: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    training_steps: int | None = Field(default=None, ge=0)

    def limited(self) -> dict[str, float]:
        return {unit: value for unit in UNITS if (value := getattr(self, unit)) is not None}


class Quota(BaseModel):
    """A key's quota: limits per UTC day and per UTC calendar month."""

    model_config = ConfigDict(extra="forbid")

    day: Limits = Field(default_factory=Limits)
    month: Limits = Field(default_factory=Limits)

    @property
    def unlimited(self) -> bool:
        return not self.day.limited() and not self.month.limited()

    def stored(self) -> dict[str, Any] | None:
        """The `api_keys.quota` value: None when nothing is limited."""
        return None if self.unlimited else self.model_dump(mode="json")


def quota_of(stored: Mapping[str, Any] | None) -> Quota | None:
    """A key's quota from its `api_keys.quota` column (None: unlimited)."""
    if not stored:
        return None
    quota = Quota.model_validate(dict(stored))
    return None if quota.unlimited else quota


@dataclass(frozen=True)
class Units:
    images: int = 0
    megapixel_steps: float = 0.0
    training_steps: int = 0

    def __add__(self, other: Units) -> Units:
        return Units(
            self.images + other.images,
            self.megapixel_steps + other.megapixel_steps,
            self.training_steps + other.training_steps,
        )

    def as_dict(self) -> dict[str, float]:
        return {unit: getattr(self, unit) for unit in UNITS}

    def columns(self) -> dict[str, Any]:
        """The job row's `units_*` values."""
        return {f"units_{unit}": value for unit, value in self.as_dict().items()}


def job_units(kind: str, payload: Mapping[str, Any]) -> Units:
    """What a job is metered as if it succeeds. Image jobs (every image task) carry width, height
    and steps in their payload; a training job its steps (none given: nothing to meter)."""
    if kind == "training":
        return Units(training_steps=int(payload.get("steps") or 0))
    if all(payload.get(name) for name in ("width", "height", "steps")):
        steps = int(payload["steps"])
        return Units(images=1, megapixel_steps=int(payload["width"]) * int(payload["height"]) / 1e6 * steps)
    return Units()


def row_units(row: Mapping[str, Any]) -> Units:
    """A job row's units (a row built without them is inserted as metering nothing)."""
    return Units(*(row.get(f"units_{unit}") or 0 for unit in UNITS))


def _summed(row: Any) -> Units:
    """A row of per-unit SQL sums as `Units`, each sum in its unit's Python type."""
    return Units(int(row.images), float(row.megapixel_steps), int(row.training_steps))


# ---- metering --------------------------------------------------------------------------------


def metering(dialect: str, jobs: FromClause, *where: ColumnElement[bool]) -> Insert:
    """Add the units of the `jobs` rows (the jobs table, or rows a statement just moved) that
    match `where` to their keys' rows for the day: INSERT ... SELECT ... ON CONFLICT, with the
    parameters of `metering_params`. A job that meters nothing adds no row."""
    # A row inserted without units meters nothing (`row_units`): NULL counts as 0.
    units = [func.coalesce(jobs.c[f"units_{unit}"], 0) for unit in UNITS]
    day = bindparam("b_day", type_=_DAYS.c.day.type)
    shard = bindparam("b_shard", type_=_DAYS.c.shard.type)
    rows = select(jobs.c.api_key_id, day, shard, *units).where(*where, or_(*(unit > 0 for unit in units)))
    upsert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(_DAYS)
    upsert = upsert.from_select(["api_key_id", "day", "shard", *UNITS], rows)
    return upsert.on_conflict_do_update(
        index_elements=[_DAYS.c.api_key_id, _DAYS.c.day, _DAYS.c.shard],
        set_={unit: _DAYS.c[unit] + upsert.excluded[unit] for unit in UNITS},
    )


def metering_params(now: datetime, shard: int | None = None) -> dict[str, Any]:
    """Today (UTC), on this process's row (`shard`: another row, for tests)."""
    return {"b_day": now.astimezone(UTC).date(), "b_shard": process_shard() if shard is None else shard}


# The job columns a metering statement reads.
METERED_COLUMNS = (_JOBS.c.api_key_id, *(_JOBS.c[f"units_{unit}"] for unit in UNITS))


@cache
def _metering_statement(dialect: str) -> Insert:
    # Built once per dialect: it runs in every transaction that finishes a job.
    return metering(dialect, _JOBS, _JOBS.c.id == bindparam("b_id"))


def record_success(conn: Connection, job_id: str, now: datetime, shard: int | None = None) -> None:
    """Count a job that just moved to succeeded into its key's usage for today, in the
    transaction that moved it (`metering_params`)."""
    conn.execute(_metering_statement(conn.dialect.name), {"b_id": job_id, **metering_params(now, shard)})


def day_rows(conn: Connection, api_key_id: str, first: date, last: date) -> dict[date, Units]:
    """A key's metered units per UTC day from `first` to `last`, every process's rows summed
    (days without any left out)."""
    query = (
        select(_DAYS.c.day, *(func.sum(_DAYS.c[unit]).label(unit) for unit in UNITS))
        .where(_DAYS.c.api_key_id == api_key_id, _DAYS.c.day >= first, _DAYS.c.day <= last)
        .group_by(_DAYS.c.day)
    )
    return {row.day: _summed(row) for row in conn.execute(query)}


def usage_report(conn: Connection, api_key_id: str, quota: Quota | None, days: int, now: datetime) -> dict[str, Any]:
    """`GET /v1/usage`: the key's units for each of the last `days` UTC days (today last, every
    day listed), and its quota (None: unlimited)."""
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be from 1 to {MAX_DAYS}")
    today = now.astimezone(UTC).date()
    first = today - timedelta(days=days - 1)
    found = day_rows(conn, api_key_id, first, today)
    listed = []
    for offset in range(days):
        day = first + timedelta(days=offset)
        units = found.get(day, Units())
        listed.append({"date": day.isoformat(), **units.as_dict()})
    return {"key_id": api_key_id, "days": listed, "quota": None if quota is None else quota.model_dump(mode="json")}


# ---- quotas ----------------------------------------------------------------------------------

_UNFINISHED = sorted(s.value for s in NON_TERMINAL)
# FOR NO KEY UPDATE, not FOR UPDATE: every job, usage and rate row a transaction inserts for the key
# holds a KEY SHARE lock on the key's row (their foreign keys), which FOR UPDATE would wait for.
# Two replicas' groups, each holding one from an earlier insert, would then deadlock.
_QUOTA_FOR_UPDATE = select(_KEYS.c.quota).where(_KEYS.c.id == bindparam("b_key")).with_for_update(key_share=True)
_QUOTA = select(_KEYS.c.quota).where(_KEYS.c.id == bindparam("b_key"))


def _sums() -> Any:
    """The day's, the month's and the unfinished jobs' units of one key, as one statement (one
    snapshot on PostgreSQL, see the module docstring)."""

    def days(label: str, since: str) -> Any:
        return select(
            literal(label).label("part"),
            *(func.coalesce(func.sum(_DAYS.c[unit]), 0).label(unit) for unit in UNITS),
        ).where(
            _DAYS.c.api_key_id == bindparam("b_key"),
            _DAYS.c.day >= bindparam(since, type_=_DAYS.c.day.type),
            _DAYS.c.day <= bindparam("b_today", type_=_DAYS.c.day.type),
        )

    unfinished = select(
        literal("unfinished").label("part"),
        *(func.coalesce(func.sum(_JOBS.c[f"units_{unit}"]), 0).label(unit) for unit in UNITS),
    ).where(_JOBS.c.api_key_id == bindparam("b_key"), _JOBS.c.status.in_(_UNFINISHED))
    return union_all(days("day", "b_today"), days("month", "b_month"), unfinished)


_SUMS = _sums()


def _resets(period: str, today: date) -> str:
    if period == "day":
        following = today + timedelta(days=1)
    else:
        following = (today.replace(day=1) + timedelta(days=32)).replace(day=1)
    return f"{following.isoformat()}T00:00:00Z"


_READ_IT: Any = object()


def refusal(
    conn: Connection, api_key_id: str, adding: Units, now: datetime, quota: Mapping[str, Any] | None = _READ_IT
) -> QuotaExceeded | None:
    """Why the key's quota has no room for jobs worth `adding`, or None; call it in the
    transaction that inserts them. `quota` is the key's `api_keys.quota` as already read in this
    transaction (left out: read here)."""
    stored = conn.scalar(_QUOTA, {"b_key": api_key_id}) if quota is _READ_IT else quota
    limits = quota_of(stored)
    if limits is not None and conn.dialect.name == "postgresql":
        # Replicas admitting for this key take turns from here to their commit.
        limits = quota_of(conn.scalar(_QUOTA_FOR_UPDATE, {"b_key": api_key_id}))
    if limits is None:
        return None
    today = now.astimezone(UTC).date()
    params = {"b_key": api_key_id, "b_today": today, "b_month": today.replace(day=1)}
    parts = {row.part: _summed(row) for row in conn.execute(_SUMS, params)}
    unfinished = parts.get("unfinished", Units())
    for period in PERIODS:
        spent = parts.get(period, Units())
        for unit, limit in getattr(limits, period).limited().items():
            used, pending, asked = getattr(spent, unit), getattr(unfinished, unit), getattr(adding, unit)
            if asked > 0 and used + pending + asked > limit + _EPSILON:
                return QuotaExceeded(_reason(period, unit, limit, used, pending, asked, today))
    return None


def _reason(period: str, unit: str, limit: float, used: float, pending: float, asked: float, today: date) -> str:
    name = unit.replace("_", "-")
    adjective, window = ("daily", "today (UTC)") if period == "day" else ("monthly", "this month (UTC)")
    held = f" and {_fmt(pending)} held by unfinished requests" if pending else ""
    return (
        f"{adjective} quota of {_fmt(limit)} {name} reached: {_fmt(used)} used {window}{held}, "
        f"this request needs {_fmt(asked)}; it resets at {_resets(period, today)} "
        "(ask the operator to raise it)"
    )


def _fmt(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_rows(conn: Connection, rows: Sequence[Mapping[str, Any]], now: datetime) -> QuotaExceeded | None:
    """`refusal` for new job rows (each key's rows together), in the transaction inserting them."""
    totals: defaultdict[str, Units] = defaultdict(Units)
    for row in rows:
        totals[row["api_key_id"]] += row_units(row)
    for api_key_id in sorted(totals):
        refused = refusal(conn, api_key_id, totals[api_key_id], now)
        if refused is not None:
            return refused
    return None


def set_quota_statement(api_key_id: str, quota: Quota | None) -> Any:
    stored = None if quota is None else quota.stored()
    return update(_KEYS).where(_KEYS.c.id == api_key_id).values(quota=null() if stored is None else stored)
