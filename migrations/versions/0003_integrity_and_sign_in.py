"""Tamper evidence for every record and sign-in throttling.

- SQLite: triggers that refuse INSERT OR REPLACE (and upserts) into the append-only tables, which would
  otherwise delete the old row without firing the DELETE trigger; all append-only triggers are recreated
  from this revision's definitions (medvqa/db/append_only.py checks them at head).
- PostgreSQL: the refusing function is recreated unchanged (its triggers already cover ON CONFLICT DO UPDATE).
- `sign_in_attempts`: keyed hashes of names and source addresses tried, for lockout and throttling.
- `sessions.ended_reason`: why a workbench session ended (signed out, idle, lifetime, disabled, role changed).

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_ONLY_TABLES = ("audit_events", "feedback")
REPLACE_KEYS = {"audit_events": ("seq", "hash"), "feedback": ("id", "idempotency_key", "supersedes_id")}
PG_FUNCTION = """
CREATE OR REPLACE FUNCTION medvqa_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$
"""


def _sqlite_triggers(table: str) -> dict[str, str]:
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


def upgrade() -> None:
    op.create_table(
        "sign_in_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("username_key", sa.String(length=64), nullable=False),
        sa.Column("source_key", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sign_in_attempts")),
    )
    with op.batch_alter_table("sign_in_attempts", schema=None) as batch_op:
        batch_op.create_index("ix_sign_in_attempts_source_ts", ["source_key", "ts"], unique=False)
        batch_op.create_index("ix_sign_in_attempts_username_ts", ["username_key", "ts"], unique=False)
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ended_reason", sa.String(length=32), nullable=True))

    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
        return
    for table in APPEND_ONLY_TABLES:
        for name, sql in _sqlite_triggers(table).items():
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
            op.execute(sql)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for table in APPEND_ONLY_TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_replace")
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_column("ended_reason")
    with op.batch_alter_table("sign_in_attempts", schema=None) as batch_op:
        batch_op.drop_index("ix_sign_in_attempts_username_ts")
        batch_op.drop_index("ix_sign_in_attempts_source_ts")
    op.drop_table("sign_in_attempts")
