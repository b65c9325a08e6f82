"""PostgreSQL tells every orchestrator replica when a job is queued or finished: a trigger on
`jobs` sends `NOTIFY dippy_jobs, '<status> <job id>'`, delivered when the transaction commits
(`Store.listen`). A replica's dispatcher then wakes for work another replica queued, and its
`Prefer: wait` requests for results another replica received. SQLite has no such channel: its
processes poll (one process is the default there).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANNEL = "dippy_jobs"
ANNOUNCED = "('queued', 'succeeded', 'failed', 'canceled')"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"""
        CREATE FUNCTION jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', NEW.status || ' ' || NEW.id);
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER jobs_notify_insert AFTER INSERT ON jobs
        FOR EACH ROW EXECUTE FUNCTION jobs_notify()
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER jobs_notify_update AFTER UPDATE OF status ON jobs
        FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status AND NEW.status IN {ANNOUNCED})
        EXECUTE FUNCTION jobs_notify()
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS jobs_notify_update ON jobs")
    op.execute("DROP TRIGGER IF EXISTS jobs_notify_insert ON jobs")
    op.execute("DROP FUNCTION IF EXISTS jobs_notify()")
