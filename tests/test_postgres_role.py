"""PostgreSQL: the application runs as a role that does not own the tables (`medvqa db grant`), so no statement
it can send disables, drops or replaces the append-only triggers, rewrites an append-only row, or turns
triggers off for its session; and everything medvqa does still works as that role."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from compliance.audit_chain import AuditAnchor
from medvqa.db.engine import Database, build_engine
from medvqa.db.migrate import grant_application_role
from medvqa.errors import DatabaseError
from medvqa.services.audit import verify
from medvqa.services.feedback import FeedbackInput, give_feedback
from medvqa.services.users import authenticate
from tests import factories

REFUSED = [
    "ALTER TABLE feedback DISABLE TRIGGER USER",
    "ALTER TABLE feedback DISABLE TRIGGER feedback_append_only",
    "ALTER TABLE audit_events DISABLE TRIGGER ALL",
    "DROP TRIGGER feedback_append_only ON feedback",
    "CREATE OR REPLACE FUNCTION medvqa_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
    "SET session_replication_role = replica",
    "UPDATE feedback SET verdict = 'incorrect'",
    "DELETE FROM audit_events",
    "TRUNCATE feedback",
    "ALTER TABLE feedback OWNER TO CURRENT_USER",
]


@pytest.fixture
def app_role(db, anchor_path):
    if db.backend != "postgresql":
        pytest.skip("roles and grants are PostgreSQL's")
    role = f"medvqa_app_{uuid.uuid4().hex[:8]}"
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"CREATE ROLE {role} LOGIN"))
    grant_application_role(db, role)
    app = Database(build_engine(db.engine.url.set(username=role, password=None)), AuditAnchor(anchor_path))
    yield app
    app.dispose()
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"DROP OWNED BY {role}"))
        connection.execute(text(f"DROP ROLE {role}"))


def test_the_application_role_does_everything_medvqa_does(db, app_role, clinician, answer_id):
    give_feedback(app_role, clinician, FeedbackInput(answer_id, "correct", "as-app-role"))
    assert authenticate(app_role, clinician.name, factories.PASSWORD) == clinician
    report = verify(app_role, strict=True)
    assert report.ok, report.reason
    assert report.notes == []  # it does not own the tables
    assert any("owner of the tables" in note for note in verify(db).notes)  # the owner is told


@pytest.mark.parametrize("statement", REFUSED)
def test_the_application_role_cannot_switch_off_the_append_only_guarantee(
    db, app_role, clinician, answer_id, statement
):
    give_feedback(app_role, clinician, FeedbackInput(answer_id, "correct", "k"))
    with pytest.raises(DBAPIError), app_role.engine.begin() as connection:
        connection.execute(text(statement))
    assert verify(db, strict=True).ok


def test_grant_refuses_unknown_or_odd_role_names(db):
    if db.backend != "postgresql":
        with pytest.raises(DatabaseError, match="PostgreSQL only"):
            grant_application_role(db, "medvqa_app")
        return
    with pytest.raises(DatabaseError, match="does not exist"):
        grant_application_role(db, "no_such_role_here")
    with pytest.raises(DatabaseError, match="not a plain PostgreSQL role name"):
        grant_application_role(db, 'x"; DROP TABLE feedback; --')
