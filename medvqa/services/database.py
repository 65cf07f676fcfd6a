"""The database as the command line and the workbench see it: open it, check or bring its schema up to date,
grant an application role, and turn a driver failure into one line.

The CLI and the workbench go through this module (and the other services) only; they never import
SQLAlchemy or `medvqa.db` themselves (tests/test_import_boundaries.py keeps it so).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.exc import OperationalError

from compliance.audit_chain import AuditAnchor
from medvqa.config import Settings, load_settings, normalize_database_url
from medvqa.db.engine import Database, build_engine
from medvqa.db.migrate import current_revision, ensure_current, grant_application_role, upgrade

__all__ = [
    "Database",
    "database_error",
    "database_url",
    "grant_role",
    "open_database",
    "open_url",
    "upgrade_database",
]


def open_database(settings: Settings | None = None, *, migrated: bool = True) -> Database:
    """The configured database (MEDVQA_DATABASE_URL); with `migrated`, checked to be at the schema this code
    expects (else one line naming `medvqa db upgrade`). An embedded SQLite database gets its home created."""
    settings = settings or load_settings()
    if settings.sqlalchemy_url.get_backend_name() == "sqlite":
        settings.home.mkdir(parents=True, exist_ok=True)
    db = Database.from_settings(settings)
    if migrated:
        ensure_current(db)
    return db


def open_url(
    url: str, anchor: tuple[Path, Path], *, busy_timeout_ms: int, write_retries: int, migrated: bool = True
) -> Database:
    """A database from its URL as a plain string (for a cache keyed by strings, as the workbench's)."""
    db = Database(build_engine(normalize_database_url(url), busy_timeout_ms), AuditAnchor(*anchor), write_retries)
    if migrated:
        ensure_current(db)
    return db


def upgrade_database(db: Database) -> tuple[str | None, str | None]:
    """Create the schema or migrate it to this code's head; returns the revisions before and after."""
    before = current_revision(db)
    upgrade(db)
    return before, current_revision(db)


def grant_role(db: Database, role: str) -> list[str]:
    """PostgreSQL: grant the existing role what the application needs and no more; returns the statements."""
    return grant_application_role(db, role)


def database_url(db: Database, *, hide_password: bool = True) -> str:
    """The database's URL as text, its password masked unless asked otherwise."""
    return db.engine.url.render_as_string(hide_password=hide_password)


def database_error(exc: BaseException) -> str | None:
    """One line for a failure of the database itself (unreachable, locked, refused), None for anything else."""
    if isinstance(exc, OperationalError):
        lines = str(exc.orig).strip().splitlines() or [type(exc.orig).__name__]
        return f"cannot use the database: {lines[0]}"
    return None
