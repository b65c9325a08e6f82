"""Owed audits: `jobs.audit_owed`, with a partial index that holds only those jobs.

The audits leader looks for jobs picked for an audit that have no verdict yet at every turn of
its loop (every two seconds by default). That look used to be `jobs.audit` and no row in
`audits`: a scan of every job ever picked, which grows with the subnet's history. A job is now
owed from its pick until its verdict is stored (`Store.flag_for_audit`, `Store.add_audit`), and
the look reads only the partial index of owed jobs. `jobs.audit` still records that a job was
picked, which scores read.

Jobs picked before this revision and still without a verdict become owed here. The column's
server default is false on both backends, so adding it rewrites no table (a SQLite batch
rebuild would drop the job state machine's triggers of revision 0003).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_jobs = sa.table(
    "jobs", sa.column("id", sa.String), sa.column("audit", sa.Boolean), sa.column("audit_owed", sa.Boolean)
)
_audits = sa.table("audits", sa.column("job_id", sa.String))
_OWED = _jobs.c.audit_owed.is_(sa.true())


def upgrade() -> None:
    op.add_column("jobs", sa.Column("audit_owed", sa.Boolean(), nullable=False, server_default=sa.false()))
    judged = sa.exists().where(_audits.c.job_id == _jobs.c.id)
    op.execute(_jobs.update().where(_jobs.c.audit.is_(sa.true()), ~judged).values(audit_owed=True))
    op.create_index("ix_jobs_audit_owed", "jobs", ["updated_at", "id"], sqlite_where=_OWED, postgresql_where=_OWED)


def downgrade() -> None:
    op.drop_index("ix_jobs_audit_owed", table_name="jobs")
    # A plain DROP COLUMN (SQLite has one since 3.35): a batch rebuild would drop the triggers.
    op.drop_column("jobs", "audit_owed")
