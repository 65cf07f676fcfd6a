"""Model validations: an administrator's signed statement that a model (base weights and adapter) is validated
for clinical use; until one matches the live model, every answer carries the "not validated" banner.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "model_validations",
        sa.Column("id", ID, nullable=False),
        sa.Column("model_weights", sa.String(length=64), nullable=False),
        sa.Column("adapter_sha256", sa.String(length=64), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("statement", sa.Text(), nullable=False),
        sa.Column("signed_by", ID, nullable=False),
        sa.Column("signer_name", sa.String(length=200), nullable=False),
        sa.Column("signature_meaning", sa.String(length=200), nullable=False),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_by", ID, nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoke_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["signed_by"], ["users.id"], name=op.f("fk_model_validations_signed_by_users")),
        sa.ForeignKeyConstraint(["revoked_by"], ["users.id"], name=op.f("fk_model_validations_revoked_by_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_validations")),
    )


def downgrade() -> None:
    op.drop_table("model_validations")
