"""`medvqa db`: create, migrate and grant the database."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from medvqa.cli.support import emit as _emit
from medvqa.cli.support import json_option as _json_option
from medvqa.cli.support import open_database as _open_database

if TYPE_CHECKING:
    pass


@click.group()
def db() -> None:
    """Create and migrate the database."""


@db.command("upgrade")
@_json_option
def db_upgrade(as_json: bool) -> None:
    """Create the database or migrate it to the schema this code expects (MEDVQA_DATABASE_URL)."""
    from medvqa.services.database import database_url, upgrade_database

    database = _open_database(migrated=False)
    before, after = upgrade_database(database)
    url = database_url(database)
    _emit(as_json, {"database": url, "from": before, "to": after}, f"database {url}: {before or 'empty'} -> {after}")


@db.command("grant")
@click.argument("role")
@_json_option
def db_grant(role: str, as_json: bool) -> None:
    """PostgreSQL: grant the existing role ROLE what the application needs and no more (insert-only on the
    append-only tables), so that the workbench can run as a role that cannot disable their triggers. Run it
    as the tables' owner, after `medvqa db upgrade`."""
    from medvqa.services.database import grant_role

    statements = grant_role(_open_database(migrated=False), role)
    _emit(as_json, {"role": role, "statements": statements}, "\n".join(f"{s};" for s in statements))
