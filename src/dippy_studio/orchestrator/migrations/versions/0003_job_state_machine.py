"""The database enforces the job state machine: triggers on `jobs` refuse a status change that is
not in `job_transitions`, and a new job that is not queued. `jobs.kind` is no longer limited to a
fixed list: job kinds are registry entries (`orchestrator.kinds`).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

The store already changes a status only by compare-and-set against `states.TRANSITIONS`; these
triggers also hold for every other writer (another replica's older code, an operator's SQL). The
allowed pairs are data in `job_transitions`, readable by operators. An UPDATE that leaves the
status as it is passes, so other columns can change freely.

The refusal reads `illegal job transition: <from> -> <to>` on both dialects; on PostgreSQL it also
carries SQLSTATE 23J01 (class 23, so drivers raise an IntegrityError). `states.is_illegal_transition`
recognises it. Older SQLite (3.40, say) takes only a literal message in RAISE, so its trigger picks
one per pair of statuses.

The transitions below are a frozen copy of `states.TRANSITIONS` as of this revision: a migration
must keep meaning what it meant. A test checks that the database's set equals the live one; change
both through a new migration. On SQLite, a later migration that rebuilds `jobs` (batch mode) drops
these triggers with the old table and must create them again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = ("queued", "dispatched", "running", "succeeded", "failed", "canceled")
INITIAL = "queued"
TRANSITIONS = (
    ("queued", "dispatched"),
    ("queued", "failed"),
    ("queued", "canceled"),
    ("dispatched", "running"),
    ("dispatched", "queued"),
    ("dispatched", "succeeded"),
    ("dispatched", "failed"),
    ("dispatched", "canceled"),
    ("running", "queued"),
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "canceled"),
)
MESSAGE = "illegal job transition"
SQLSTATE = "23J01"


def upgrade() -> None:
    # Job kinds are data (the orchestrator's registry), not a list the schema fixes. Dropped before
    # the triggers exist: on SQLite, batch mode rebuilds the table, which would drop them.
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_kind"), type_="check")
    table = op.create_table(
        "job_transitions",
        sa.Column("from_status", sa.String(length=16), nullable=False),
        sa.Column("to_status", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("from_status", "to_status", name=op.f("pk_job_transitions")),
    )
    op.bulk_insert(table, [{"from_status": frm, "to_status": to} for frm, to in TRANSITIONS])
    if op.get_bind().dialect.name == "postgresql":
        _create_postgresql_triggers()
    else:
        _create_sqlite_triggers()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS jobs_check_status_update ON jobs")
        op.execute("DROP TRIGGER IF EXISTS jobs_check_status_insert ON jobs")
        op.execute("DROP FUNCTION IF EXISTS jobs_check_status()")
    else:
        op.execute("DROP TRIGGER IF EXISTS jobs_check_status_update")
        op.execute("DROP TRIGGER IF EXISTS jobs_check_status_insert")
    op.drop_table("job_transitions")
    with op.batch_alter_table("jobs") as batch:
        batch.create_check_constraint("kind", "kind IN ('inference', 'training')")


def _create_postgresql_triggers() -> None:
    op.execute(
        f"""
        CREATE FUNCTION jobs_check_status() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                RAISE EXCEPTION '{MESSAGE}: a new job must be {INITIAL}, not %', NEW.status
                    USING ERRCODE = '{SQLSTATE}';
            END IF;
            IF NOT EXISTS (
                SELECT 1 FROM job_transitions WHERE from_status = OLD.status AND to_status = NEW.status
            ) THEN
                RAISE EXCEPTION '{MESSAGE}: % -> %', OLD.status, NEW.status USING ERRCODE = '{SQLSTATE}';
            END IF;
            RETURN NEW;
        END
        $$
        """
    )
    # The WHEN clauses keep the function off the hot path: most writes keep or set a legal status.
    op.execute(
        f"""
        CREATE TRIGGER jobs_check_status_insert BEFORE INSERT ON jobs
        FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM '{INITIAL}') EXECUTE FUNCTION jobs_check_status()
        """
    )
    op.execute(
        """
        CREATE TRIGGER jobs_check_status_update BEFORE UPDATE OF status ON jobs
        FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status) EXECUTE FUNCTION jobs_check_status()
        """
    )


def _create_sqlite_triggers() -> None:
    not_initial = "\n".join(
        f"WHEN '{status}' THEN RAISE(ABORT, '{MESSAGE}: a new job must be {INITIAL}, not {status}')"
        for status in STATUSES
        if status != INITIAL
    )
    op.execute(
        f"""
        CREATE TRIGGER jobs_check_status_insert BEFORE INSERT ON jobs
        WHEN NEW.status IS NOT '{INITIAL}'
        BEGIN
            SELECT CASE NEW.status
            {not_initial}
            ELSE RAISE(ABORT, '{MESSAGE}: a new job must be {INITIAL}')
            END;
        END
        """
    )
    # Every ordered pair gets its message, not only the pairs refused today: the allowed set is
    # the table's rows, which a later migration may change.
    pairs = "\n".join(
        f"WHEN '{frm} -> {to}' THEN RAISE(ABORT, '{MESSAGE}: {frm} -> {to}')"
        for frm in STATUSES
        for to in STATUSES
        if frm != to
    )
    op.execute(
        f"""
        CREATE TRIGGER jobs_check_status_update BEFORE UPDATE OF status ON jobs
        WHEN NEW.status IS NOT OLD.status AND NOT EXISTS (
            SELECT 1 FROM job_transitions WHERE from_status = OLD.status AND to_status = NEW.status
        )
        BEGIN
            SELECT CASE OLD.status || ' -> ' || NEW.status
            {pairs}
            ELSE RAISE(ABORT, '{MESSAGE}')
            END;
        END
        """
    )
