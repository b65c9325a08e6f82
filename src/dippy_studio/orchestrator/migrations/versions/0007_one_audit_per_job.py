"""One audit verdict per job: `audits.job_id` becomes unique.

A replica that loses the audit lead between judging a job and storing its verdict could store a
second verdict beside the new leader's; scores would then count that job twice. The unique index
makes the database keep the first verdict (`Store.add_audit` inserts with ON CONFLICT DO NOTHING).
Databases that already hold such pairs keep each job's first verdict (lowest id).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DELETE FROM audits WHERE id NOT IN (SELECT MIN(id) FROM audits GROUP BY job_id)")
    op.drop_index(op.f("ix_audits_job_id"), table_name="audits")
    op.create_index(op.f("ix_audits_job_id"), "audits", ["job_id"], unique=True)


def downgrade() -> None:
    op.drop_index(op.f("ix_audits_job_id"), table_name="audits")
    op.create_index(op.f("ix_audits_job_id"), "audits", ["job_id"], unique=False)
