"""Engines and sessions. SQLite: WAL, foreign keys on, busy timeout, writes begin IMMEDIATE.
PostgreSQL: psycopg 3, READ COMMITTED; writers serialise on an advisory lock (see services.transaction)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker

from compliance.audit_chain import AuditAnchor
from medvqa.config import Settings

READ_ONLY = "medvqa_read_only"


def build_engine(url: URL, sqlite_busy_timeout_ms: int = 30_000) -> Engine:
    if url.get_backend_name() == "sqlite":
        return _build_sqlite_engine(url, sqlite_busy_timeout_ms)
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=64)


def _build_sqlite_engine(url: URL, busy_timeout_ms: int) -> Engine:
    engine = create_engine(url, connect_args={"timeout": busy_timeout_ms / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so that "begin" below decides.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # an acknowledged write survives power loss
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front: two writers never both read, then deadlock upgrading.
        read_only = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


@dataclass
class Database:
    """An engine, its session factories, and the audit anchor that goes with this database."""

    engine: Engine
    anchor: AuditAnchor
    write_retries: int = 8

    def __post_init__(self) -> None:
        from medvqa.db import tracking

        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self.engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)
        tracking.install(self._sessions)
        tracking.install(self._read_sessions)

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        engine = build_engine(settings.sqlalchemy_url, settings.sqlite_busy_timeout_ms)
        anchor = AuditAnchor(settings.audit_anchor_path, settings.audit_anchor_key_path)
        return cls(engine, anchor, settings.write_retries)

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def session(self) -> Session:
        """A session for a write transaction (use through services.transaction.write)."""
        return self._sessions()

    def read_session(self) -> Session:
        """A session that never takes the SQLite write lock; for queries and verification."""
        return self._read_sessions()

    def dispose(self) -> None:
        self.engine.dispose()
