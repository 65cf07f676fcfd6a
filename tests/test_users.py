"""Accounts: argon2 hashes only, clear refusals, audited sign-in."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text

from medvqa.db import AuditEvent, User
from medvqa.errors import AccessDenied, InvalidInput
from medvqa.services.users import add_user, authenticate
from tests.factories import OPERATOR, PASSWORD


def dump_database(db) -> str:
    with db.engine.connect() as connection:
        tables = ["users", "audit_events", "sessions"]
        return repr([connection.execute(text(f"SELECT * FROM {t}")).all() for t in tables])


def test_password_is_stored_as_argon2_only(db):
    add_user(db, OPERATOR, "dr.house", PASSWORD, "clinician", "Gregory House")
    with db.read_session() as session:
        user = session.scalars(select(User)).one()
        event = session.scalars(select(AuditEvent)).one()
    assert user.password_hash.startswith("$argon2id$")
    assert PASSWORD not in dump_database(db)
    # The event names the account and role, and vouches for the row it wrote (its digest), never the password.
    (digest,) = [d for table, key, d in event.details["row_digests"] if (table, key) == ("users", user.id)]
    assert event.details == {"username": "dr.house", "role": "clinician", "row_digests": [["users", user.id, digest]]}
    assert len(digest) == 64 and PASSWORD not in str(event.details)
    assert (event.actor_name, event.actor_role, event.object_id) == ("cli:test", "admin", str(user.id))


@pytest.mark.parametrize(
    ("username", "password", "role", "message"),
    [
        ("Dr House", PASSWORD, "clinician", "username 'Dr House'"),
        ("x", PASSWORD, "clinician", "username 'x'"),
        ("dr.house", "short", "clinician", "at least 12 characters"),
        ("dr.house", "my-dr.house-password", "clinician", "must not contain the username"),
        ("dr.house", PASSWORD, "surgeon", "role 'surgeon' does not exist"),
    ],
)
def test_bad_account_input_is_refused(db, username, password, role, message):
    with pytest.raises(InvalidInput, match=message):
        add_user(db, OPERATOR, username, password, role)
    with db.read_session() as session:
        assert session.scalars(select(User)).all() == []


def test_duplicate_username_is_refused(db):
    add_user(db, OPERATOR, "dr.house", PASSWORD, "clinician")
    with pytest.raises(InvalidInput, match="already exists"):
        add_user(db, OPERATOR, "dr.house", PASSWORD + "x", "admin")


def test_sign_in_succeeds_and_fails_alike_and_is_audited(db):
    add_user(db, OPERATOR, "dr.house", PASSWORD, "clinician")
    actor = authenticate(db, "dr.house", PASSWORD)
    assert (actor.name, actor.role) == ("dr.house", "clinician") and actor.user_id
    messages = []
    for username, password in [("dr.house", "wrong password!"), ("nobody", PASSWORD)]:
        with pytest.raises(AccessDenied) as raised:
            authenticate(db, username, password)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]  # no hint whether the account exists
    with db.read_session() as session:
        logins = session.scalars(select(AuditEvent).where(AuditEvent.action == "auth:session:login")).all()
    assert [(e.actor_name, e.outcome) for e in logins] == [
        ("dr.house", "success"),
        ("dr.house", "failed"),
        ("nobody", "failed"),
    ]


def test_disabled_account_cannot_sign_in(db):
    user = add_user(db, OPERATOR, "dr.house", PASSWORD, "clinician")
    with db.session() as session, session.begin():
        session.get(User, user.id).is_active = False
    with pytest.raises(AccessDenied):
        authenticate(db, "dr.house", PASSWORD)
