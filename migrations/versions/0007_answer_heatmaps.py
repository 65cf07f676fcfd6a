"""Answer heatmaps: where the model looked for an answer (the saliency map on the image-token grid, its hash,
the method, and the sanity checks of the model that made it), made on request, once per answer.

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "answer_heatmaps",
        sa.Column("id", ID, nullable=False),
        sa.Column("answer_id", ID, nullable=False),
        sa.Column("method", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("grid", sa.JSON(), nullable=False),
        sa.Column("checks", sa.JSON(), nullable=False),
        sa.Column("created_by", ID, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["answer_id"], ["answers.id"], name=op.f("fk_answer_heatmaps_answer_id_answers")),
        sa.ForeignKeyConstraint(["created_by"], ["users.id"], name=op.f("fk_answer_heatmaps_created_by_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_answer_heatmaps")),
        sa.UniqueConstraint("answer_id", name=op.f("uq_answer_heatmaps_answer_id")),
    )


def downgrade() -> None:
    op.drop_table("answer_heatmaps")
