"""Counters per process: `shard` in the primary keys of `rate_windows` and `usage_days`.

Every request adds one to its key's rate window, and every success adds its job's units to its
key's usage row for the day; each holds that row's lock until its transaction commits. With one
row per key and window (or day), replicas serving one busy key took turns at those locks. Each
orchestrator process now counts into rows of its own (a shard drawn at random when it starts),
and reads sum them.

Existing rows become shard 0. On the way down, the shards of each window and day are summed back
into one row.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Per table: its primary key before this revision, and its counts.
_COUNTERS = {
    "rate_windows": (("api_key_id", "window_start"), ("count",)),
    "usage_days": (("api_key_id", "day"), ("images", "megapixel_steps", "training_steps")),
}


def upgrade() -> None:
    # Neither table has triggers, so SQLite's batch rebuild (its only way to change a primary key)
    # loses nothing.
    for table, (key, _) in _COUNTERS.items():
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("shard", sa.Integer(), nullable=False, server_default="0"))
            batch.drop_constraint(f"pk_{table}", type_="primary")
            batch.create_primary_key(f"pk_{table}", [*key, "shard"])


def downgrade() -> None:
    conn = op.get_bind()
    for name, (key, counts) in _COUNTERS.items():
        table = sa.table(name, *(sa.column(c) for c in key), *(sa.column(c) for c in counts))
        summed = conn.execute(
            sa.select(*(table.c[c] for c in key), *(sa.func.sum(table.c[c]).label(c) for c in counts)).group_by(
                *(table.c[c] for c in key)
            )
        ).all()
        conn.execute(table.delete())
        with op.batch_alter_table(name) as batch:
            batch.drop_constraint(f"pk_{name}", type_="primary")
            batch.drop_column("shard")
            batch.create_primary_key(f"pk_{name}", list(key))
        if summed:
            conn.execute(table.insert(), [row._asdict() for row in summed])
