"""Alembic environment. medvqa passes an open connection (config.attributes["connection"]);
the plain `alembic` command falls back to the configured database."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

import medvqa.db  # noqa: F401  (registers every model on Base.metadata)
from medvqa.config import load_settings
from medvqa.db.base import Base
from medvqa.db.engine import build_engine


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    settings = load_settings()
    engine = build_engine(settings.sqlalchemy_url, settings.sqlite_busy_timeout_ms)
    with engine.connect() as connection:
        _configure(connection)
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("medvqa migrations run online only: connect to the database")
run_migrations_online()
