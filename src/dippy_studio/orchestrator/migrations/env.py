"""Alembic environment, run by `dippy_studio.orchestrator.db.upgrade` with an engine in
`config.attributes["engine"]`. Configured in code; there is no alembic.ini at run time.

Developers making a new revision:
    alembic -c src/dippy_studio/orchestrator/migrations/alembic.ini revision --autogenerate -m "..."
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from dippy_studio.orchestrator.db import WRITE_OPTION, make_engine
from dippy_studio.orchestrator.models import Base

# Any constant works; it only has to be the same in every orchestrator process.
_PG_MIGRATION_LOCK = 0x6469707079  # "dippy"


def run_migrations_online() -> None:
    engine = context.config.attributes.get("engine")
    if engine is None:
        # A developer running the `alembic` command with migrations/alembic.ini.
        engine = make_engine(context.config.get_main_option("sqlalchemy.url"))
    with engine.execution_options(**{WRITE_OPTION: True}).connect() as connection:
        # One transaction for the whole upgrade, on SQLite too (its DDL is transactional): two
        # processes starting at once then serialize, and the second finds the schema current.
        context.configure(connection=connection, target_metadata=Base.metadata, transactional_ddl=True)
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported")
run_migrations_online()
