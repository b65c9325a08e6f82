"""Usage and quotas per API key (orchestrator/usage.py).

- `jobs.units_*`: what a job is metered as (images, megapixel-steps, training steps), fixed when
  it is queued, so a quota check can sum what a key has in flight without reading payloads.
- `usage_days`: the units of a key's succeeded jobs per UTC day, counted in the transaction that
  marks each job succeeded; reading a month of usage is at most 31 rows.
- `api_keys.quota`: per-day and per-month limits on any unit (JSON; NULL: unlimited).
- An index on jobs (api_key_id, status): the in-flight sum reads a key's unfinished jobs only.

Jobs from before this revision get their units from their payloads, and the succeeded ones are
counted into `usage_days`, so usage covers them too.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 1000
_IMAGE_KINDS = ("inference", "edit", "img2img", "inpaint")


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("quota", sa.JSON(), nullable=True))
    for name, kind in (("images", sa.Integer()), ("megapixel_steps", sa.Float()), ("training_steps", sa.Integer())):
        op.add_column("jobs", sa.Column(f"units_{name}", kind, nullable=False, server_default="0"))
    op.create_index(op.f("ix_jobs_api_key_id_status"), "jobs", ["api_key_id", "status"], unique=False)
    op.create_table(
        "usage_days",
        sa.Column("api_key_id", sa.String(length=32), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("megapixel_steps", sa.Float(), nullable=False),
        sa.Column("training_steps", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["api_key_id"], ["api_keys.id"], name=op.f("fk_usage_days_api_key_id_api_keys"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("api_key_id", "day", name=op.f("pk_usage_days")),
    )
    _backfill(op.get_bind())


def _units(kind: str, payload: dict[str, Any]) -> tuple[int, float, int]:
    """The same rule as usage.job_units, frozen here: a migration must not change with the code."""
    if kind in _IMAGE_KINDS:
        width, height, steps = (int(payload.get(k) or 0) for k in ("width", "height", "steps"))
        return 1, width * height / 1e6 * steps, 0
    if kind == "training":
        return 0, 0.0, int(payload.get("steps") or 0)
    return 0, 0.0, 0


def _backfill(conn: sa.Connection) -> None:
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.String),
        sa.column("api_key_id", sa.String),
        sa.column("kind", sa.String),
        sa.column("status", sa.String),
        sa.column("payload", sa.JSON),
        sa.column("finished_at", sa.DateTime(timezone=True)),
        sa.column("units_images", sa.Integer),
        sa.column("units_megapixel_steps", sa.Float),
        sa.column("units_training_steps", sa.Integer),
    )
    days = sa.table(
        "usage_days",
        sa.column("api_key_id", sa.String),
        sa.column("day", sa.Date),
        sa.column("images", sa.Integer),
        sa.column("megapixel_steps", sa.Float),
        sa.column("training_steps", sa.Integer),
    )
    set_units = (
        sa.update(jobs)
        .where(jobs.c.id == sa.bindparam("b_id"))
        .values(
            units_images=sa.bindparam("b_images"),
            units_megapixel_steps=sa.bindparam("b_mps"),
            units_training_steps=sa.bindparam("b_steps"),
        )
    )
    totals: dict[tuple[str, Any], list[float]] = defaultdict(lambda: [0, 0.0, 0])
    last = ""
    while True:
        rows = conn.execute(
            sa.select(jobs.c.id, jobs.c.api_key_id, jobs.c.kind, jobs.c.status, jobs.c.payload, jobs.c.finished_at)
            .where(jobs.c.id > last)
            .order_by(jobs.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            break
        last = rows[-1].id
        updates = []
        for row in rows:
            units = _units(row.kind, row.payload or {})
            updates.append({"b_id": row.id, "b_images": units[0], "b_mps": units[1], "b_steps": units[2]})
            if row.status == "succeeded" and row.finished_at is not None:
                finished = row.finished_at if isinstance(row.finished_at, datetime) else None
                if finished is None:
                    continue
                day = (finished if finished.tzinfo is None else finished.astimezone(UTC)).date()
                total = totals[(row.api_key_id, day)]
                for i, value in enumerate(units):
                    total[i] += value
        conn.execute(set_units, updates)
    if totals:
        conn.execute(
            sa.insert(days),
            [
                {
                    "api_key_id": key,
                    "day": day,
                    "images": int(t[0]),
                    "megapixel_steps": t[1],
                    "training_steps": int(t[2]),
                }
                for (key, day), t in totals.items()
            ],
        )


def downgrade() -> None:
    op.drop_table("usage_days")
    op.drop_index(op.f("ix_jobs_api_key_id_status"), table_name="jobs")
    # Plain DROP COLUMNs (SQLite has them since 3.35): a batch rebuild of `jobs` would drop the
    # job state machine's triggers of revision 0003.
    for name in ("training_steps", "megapixel_steps", "images"):
        op.drop_column("jobs", f"units_{name}")
    op.drop_column("api_keys", "quota")
