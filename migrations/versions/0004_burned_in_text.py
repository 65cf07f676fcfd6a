"""Burned-in text and de-identification records on instances: the OCR detector's word boxes (never the text), the
provenance of a reviewer's pixel cleaning, and the counts of values de-identification corrected.

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("burned_in_text", "pixel_cleaning", "deid_report")


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.add_column(sa.Column(name, sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        for name in reversed(COLUMNS):
            batch_op.drop_column(name)
