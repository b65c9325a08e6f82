"""Initial schema: API keys, jobs and their attempts, miners, LoRAs, audits, rate-limit windows.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Self-contained on purpose (plain `sa` types, no imports from the models): a migration must keep
describing the schema as it was, whatever the models become later. Times are TIMESTAMP WITH TIME
ZONE on PostgreSQL; on SQLite the models store naive UTC.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("webhook_secret", sa.String(length=200), nullable=False),
        sa.Column("rate_limit_per_minute", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_table(
        "miners",
        sa.Column("hotkey", sa.String(length=64), nullable=False),
        sa.Column("uid", sa.Integer(), nullable=False),
        sa.Column("coldkey", sa.String(length=64), nullable=True),
        sa.Column("endpoint", sa.String(length=2048), nullable=True),
        sa.Column("stake", sa.Float(), nullable=False),
        sa.Column("healthy", sa.Boolean(), nullable=False),
        sa.Column("last_probe_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("capacity", sa.JSON(), nullable=False),
        sa.Column("fingerprints", sa.JSON(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("hotkey", name=op.f("pk_miners")),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("api_key_id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("attempt_timeout_s", sa.Float(), nullable=False),
        sa.Column("miner_hotkey", sa.String(length=64), nullable=True),
        sa.Column("miner_uid", sa.Integer(), nullable=True),
        sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dispatch_deadline", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result_sha256", sa.String(length=64), nullable=True),
        sa.Column("result_blob", sa.String(length=64), nullable=True),
        sa.Column("result_bytes", sa.Integer(), nullable=True),
        sa.Column("fingerprint", sa.String(length=128), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("webhook_url", sa.String(length=2048), nullable=True),
        sa.Column("webhook_state", sa.String(length=16), nullable=False),
        sa.Column("webhook_attempts", sa.Integer(), nullable=False),
        sa.Column("audit", sa.Boolean(), nullable=False),
        sa.CheckConstraint("kind IN ('inference', 'training')", name=op.f("ck_jobs_kind")),
        sa.CheckConstraint(
            "status IN ('queued', 'dispatched', 'running', 'succeeded', 'failed', 'canceled')",
            name=op.f("ck_jobs_status"),
        ),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"], name=op.f("fk_jobs_api_key_id_api_keys")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_api_key_id_created_at"), "jobs", ["api_key_id", "created_at"], unique=False)
    op.create_index(op.f("ix_jobs_status_created_at"), "jobs", ["status", "created_at"], unique=False)
    op.create_index(op.f("ix_jobs_status_dispatch_deadline"), "jobs", ["status", "dispatch_deadline"], unique=False)
    op.create_table(
        "rate_windows",
        sa.Column("api_key_id", sa.String(length=32), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["api_key_id"], ["api_keys.id"], name=op.f("fk_rate_windows_api_key_id_api_keys"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("api_key_id", "window_start", name=op.f("pk_rate_windows")),
    )
    op.create_table(
        "audits",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("miner_hotkey", sa.String(length=64), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_audits_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audits")),
    )
    op.create_index(op.f("ix_audits_job_id"), "audits", ["job_id"], unique=False)
    op.create_index(op.f("ix_audits_miner_hotkey_created_at"), "audits", ["miner_hotkey", "created_at"], unique=False)
    op.create_table(
        "job_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("miner_hotkey", sa.String(length=64), nullable=False),
        sa.Column("miner_uid", sa.Integer(), nullable=True),
        sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("latency_s", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_attempts_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_attempts")),
        sa.UniqueConstraint("job_id", "attempt", name=op.f("uq_job_attempts_job_id_attempt")),
    )
    op.create_index(
        op.f("ix_job_attempts_miner_hotkey_dispatched_at"),
        "job_attempts",
        ["miner_hotkey", "dispatched_at"],
        unique=False,
    )
    op.create_table(
        "loras",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("api_key_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("trigger_word", sa.String(length=64), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source_job_id", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"], name=op.f("fk_loras_api_key_id_api_keys")),
        sa.ForeignKeyConstraint(
            ["source_job_id"], ["jobs.id"], name=op.f("fk_loras_source_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_loras")),
    )
    op.create_index(op.f("ix_loras_api_key_id_created_at"), "loras", ["api_key_id", "created_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_loras_api_key_id_created_at"), table_name="loras")
    op.drop_table("loras")
    op.drop_index(op.f("ix_job_attempts_miner_hotkey_dispatched_at"), table_name="job_attempts")
    op.drop_table("job_attempts")
    op.drop_index(op.f("ix_audits_miner_hotkey_created_at"), table_name="audits")
    op.drop_index(op.f("ix_audits_job_id"), table_name="audits")
    op.drop_table("audits")
    op.drop_table("rate_windows")
    op.drop_index(op.f("ix_jobs_status_dispatch_deadline"), table_name="jobs")
    op.drop_index(op.f("ix_jobs_status_created_at"), table_name="jobs")
    op.drop_index(op.f("ix_jobs_api_key_id_created_at"), table_name="jobs")
    op.drop_table("jobs")
    op.drop_table("miners")
    op.drop_table("api_keys")
