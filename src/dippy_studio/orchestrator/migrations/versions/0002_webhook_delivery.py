"""Webhook delivery schedule: when the next delivery attempt is due, and why the last one failed.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

`webhook_next_at` also serves as a lease: a process that takes a delivery pushes it forward by the
delivery timeout first, so another orchestrator replica does not send the same webhook at once.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("webhook_next_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("jobs", sa.Column("webhook_error", sa.Text(), nullable=True))
    op.create_index(
        op.f("ix_jobs_webhook_state_webhook_next_at"), "jobs", ["webhook_state", "webhook_next_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_jobs_webhook_state_webhook_next_at"), table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("webhook_error")
        batch.drop_column("webhook_next_at")
