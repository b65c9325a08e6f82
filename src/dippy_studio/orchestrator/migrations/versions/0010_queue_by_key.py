"""A key's queue in order: `ix_jobs_queue_by_key (api_key_id, status, created_at, id)` in place
of `ix_jobs_api_key_id_status (api_key_id, status)`.

The dispatcher's claim works out fair turns between keys from each key's first few queued jobs
(`store._candidates_by_key`, PostgreSQL), read in this index's order, so a claim costs the same
with ten or ten thousand jobs queued. The quota check's sums over a key's unfinished jobs use it
as they used the index it replaces.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_jobs_queue_by_key", "jobs", ["api_key_id", "status", "created_at", "id"])
    op.drop_index("ix_jobs_api_key_id_status", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_api_key_id_status", "jobs", ["api_key_id", "status"])
    op.drop_index("ix_jobs_queue_by_key", table_name="jobs")
