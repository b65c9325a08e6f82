"""Alembic migrations for the orchestrator database (run by `db.upgrade`)."""
