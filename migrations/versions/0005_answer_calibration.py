"""Calibrated answers: the model's raw confidence beside the calibrated one, the calibration applied (file hash
and methods), and whether the answer abstained (below the abstention threshold: not presented as an answer).

All three are NULL on answers given before calibration existed, and the row digests of the audit trail leave a
NULL later column out (medvqa/db/tracking.py, LATER_COLUMNS), so earlier answers still verify.

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("answers", sa.Column("raw_confidence", sa.Float(), nullable=True))
    op.add_column("answers", sa.Column("calibration", sa.JSON(), nullable=True))
    op.add_column("answers", sa.Column("abstained", sa.Boolean(), nullable=True))
    op.create_index("ix_answers_abstained", "answers", ["abstained"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_answers_abstained", table_name="answers")
    for name in ("abstained", "calibration", "raw_confidence"):
        if op.get_bind().dialect.name == "sqlite":
            # Native DROP COLUMN (SQLite >= 3.35): a batch copy would drop `answers`, which feedback references.
            op.execute(f"ALTER TABLE answers DROP COLUMN {name}")
        else:
            op.drop_column("answers", name)
