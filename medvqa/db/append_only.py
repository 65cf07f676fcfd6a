"""The append-only guarantee on audit_events and feedback, as the database enforces it, and its check.

The triggers are created by migrations 0002 and 0003 (migrations keep frozen copies of their DDL); this
module says what must be in place at head, so that `medvqa audit verify` can report a dropped, disabled or
rewritten trigger. SQLite keeps each trigger's SQL text as written; PostgreSQL is checked through its
catalogue (trigger enabled, events, no WHEN or column list, and the refusing function's body).
"""

from __future__ import annotations

import re

from sqlalchemy import Connection, text

APPEND_ONLY_TABLES = ("audit_events", "feedback")
# Unique keys an INSERT OR REPLACE (or an upsert) could collide on, per table.
REPLACE_KEYS = {
    "audit_events": ("seq", "hash"),
    "feedback": ("id", "idempotency_key", "supersedes_id"),
}
PG_FUNCTION_BODY = """
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END
"""
# pg_trigger.tgtype bits: ROW 1, BEFORE 2, INSERT 4, DELETE 8, UPDATE 16, TRUNCATE 32.
PG_TRIGGERS = {"append_only": 1 | 2 | 8 | 16, "no_truncate": 2 | 32}


def sqlite_triggers(table: str) -> dict[str, str]:
    """name -> CREATE TRIGGER statement, exactly as migration 0003 writes it."""
    triggers = {
        f"{table}_no_{verb.lower()}": (
            f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {verb} refused'); END"
        )
        for verb in ("UPDATE", "DELETE")
    }
    collides = " OR ".join(f"{key} = NEW.{key}" for key in REPLACE_KEYS[table])
    triggers[f"{table}_no_replace"] = (
        f"CREATE TRIGGER {table}_no_replace BEFORE INSERT ON {table} "
        f"WHEN EXISTS (SELECT 1 FROM {table} WHERE {collides}) "
        f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: REPLACE refused'); END"
    )
    return triggers


def _normalise(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip()


def problems(connection: Connection) -> list[str]:
    """What is missing or altered in the append-only triggers, one sentence each (empty: all in place)."""
    if connection.dialect.name == "sqlite":
        return _sqlite_problems(connection)
    return _postgresql_problems(connection)


def _sqlite_problems(connection: Connection) -> list[str]:
    rows = connection.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")).all()
    found: dict[str, str | None] = {str(name): sql for name, sql in rows}
    out = []
    for table in APPEND_ONLY_TABLES:
        for name, sql in sqlite_triggers(table).items():
            if name not in found:
                out.append(f"trigger {name} on {table} is missing (the append-only guarantee is off)")
            elif _normalise(found[name] or "") != _normalise(sql):
                out.append(f"trigger {name} on {table} was altered")
    return out


def _postgresql_problems(connection: Connection) -> list[str]:
    rows = connection.execute(
        text(
            "SELECT c.relname, t.tgname, t.tgenabled, t.tgtype, t.tgqual IS NULL AS no_when, "
            "t.tgattr::text = '' AS all_columns, p.proname, p.prosrc "
            "FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid "
            "WHERE c.relname IN ('audit_events', 'feedback') AND c.relnamespace = to_regnamespace(current_schema()) "
            "AND NOT t.tgisinternal"
        )
    ).all()
    found = {(row.relname, row.tgname): row for row in rows}
    out = []
    for table in APPEND_ONLY_TABLES:
        for suffix, tgtype in PG_TRIGGERS.items():
            name = f"{table}_{suffix}"
            row = found.get((table, name))
            if row is None:
                out.append(f"trigger {name} on {table} is missing (the append-only guarantee is off)")
            elif row.tgenabled not in ("O", "A"):
                out.append(f"trigger {name} on {table} is disabled (the append-only guarantee is off)")
            elif (
                row.tgtype != tgtype
                or not row.no_when
                or not row.all_columns
                or row.proname != "medvqa_refuse_change"
                or _normalise(row.prosrc) != _normalise(PG_FUNCTION_BODY)
            ):
                out.append(f"trigger {name} on {table} was altered")
    return out


def owner_warning(connection: Connection) -> str | None:
    """PostgreSQL: a warning when the application's role owns the tables (an owner can disable triggers)."""
    if connection.dialect.name != "postgresql":
        return None
    owner = connection.execute(
        text("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = to_regclass('audit_events')")
    ).scalar()
    if owner is not None and owner == connection.execute(text("SELECT current_user")).scalar():
        return (
            f"the application connects as {owner}, the owner of the tables, which may disable the append-only "
            "triggers; run it as a role with `medvqa db grant` rights only (see compliance/audit_trail.md)"
        )
    return None
