"""The database itself refuses to change or remove audit events and feedback."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from medvqa.services.feedback import FeedbackInput, give_feedback

REFUSED = [
    "UPDATE audit_events SET outcome = 'success'",
    "DELETE FROM audit_events WHERE seq = 1",
    "DELETE FROM audit_events",
    "UPDATE feedback SET verdict = 'incorrect'",
    "DELETE FROM feedback",
]


@pytest.fixture
def populated(db, clinician, answer_id):
    give_feedback(db, clinician, FeedbackInput(answer_id, "correct", "k1"))
    return db


@pytest.mark.parametrize("statement", REFUSED)
def test_changes_to_append_only_tables_are_refused(populated, statement):
    with pytest.raises(DBAPIError, match="append-only"), populated.engine.begin() as connection:
        connection.execute(text(statement))
    with populated.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM feedback")).scalar() == 1
        assert (
            connection.execute(text("SELECT count(*) FROM audit_events")).scalar() == 4
        )  # user, study, answer, feedback


@pytest.mark.parametrize("table", ["audit_events", "feedback"])
def test_truncate_is_refused_on_postgresql(populated, table):
    if populated.backend != "postgresql":
        pytest.skip("SQLite has no TRUNCATE; DELETE without WHERE is covered above")
    with pytest.raises(DBAPIError, match="append-only"), populated.engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {table} CASCADE"))


def test_other_tables_stay_editable(populated, clinician):
    with populated.engine.begin() as connection:
        connection.execute(text("UPDATE users SET display_name = 'Dr A' WHERE id = :id"), {"id": clinician.user_id})
