"""Models per job and per LoRA (an orchestrator may serve several models).

- `jobs.model`: the model (engine profile name) a job is for; routing, audits and the dashboard
  read it.
- `loras.model`: the model a LoRA was trained for, the only one it may be used with.

Rows from before this revision belong to the one profile the orchestrator served then, which the
database never recorded. They are backfilled with the default model of the orchestrator that
runs this migration (`db.upgrade(..., default_model=settings.profile)`, passed in
`config.attributes["default_model"]`): the same setting that chose their profile when they ran,
as long as the operator did not change it in between. A run with no orchestrator settings (the
`orchestrator keys` commands, the `alembic` command) reads DIPPY_ORCH_PROFILE, else "tiny" (the
setting's default). The value is written once, here, so a later change of the default model does
not relabel old jobs.

The backfill is the new column's server default: one ADD COLUMN per table, which SQLite does in
place (a batch "move and copy" would drop the job state machine's triggers of revision 0003). On
PostgreSQL the default is dropped afterwards, so a job inserted without a model fails; SQLite
cannot drop a default without rebuilding the table, so there it stays (the store always writes
the model).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

import os
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("jobs", "loras")


def _default_model() -> str:
    given = context.config.attributes.get("default_model")
    return str(given or os.environ.get("DIPPY_ORCH_PROFILE") or "tiny")


def upgrade() -> None:
    model = _default_model()
    for table in _TABLES:
        op.add_column(table, sa.Column("model", sa.String(length=64), nullable=False, server_default=model))
    if op.get_bind().dialect.name == "postgresql":
        for table in _TABLES:
            op.alter_column(table, "model", server_default=None)


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite has one since 3.35): a batch rebuild would drop the triggers.
    for table in _TABLES:
        op.drop_column(table, "model")
