"""Workbench sessions end on the server at the next request when the account is disabled or given another
role, when the absolute lifetime is reached, or when it was idle; each end is audited with its reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from medvqa.db import AuditEvent, UserSession
from medvqa.services.users import change_role, set_active
from tests import factories
from tests.factories import OPERATOR
from tests.workbench.apptest import errors, fresh_app, sign_in, signed_in
from workbench.auth import ACTOR, STARTED, TOKEN


def logout_reasons(db):
    with db.read_session() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "auth:session:logout")).all()
    return [event.details["reason"] for event in events]


def sessions(db):
    with db.read_session() as session:
        return session.scalars(select(UserSession).order_by(UserSession.id)).all()


def test_sign_in_keeps_a_server_side_session_that_sign_out_ends(db, app_env, clinician):
    app = sign_in(fresh_app(), clinician.name, factories.PASSWORD)
    token = app.session_state[TOKEN]
    (record,) = sessions(db)
    assert record.user_id == clinician.user_id and record.ended_at is None
    assert token not in repr(record.__dict__)  # only its hash is kept
    app.button(key="sign_out").click().run()
    (record,) = sessions(db)
    assert record.ended_at is not None and record.ended_reason == "signed out"


@pytest.mark.parametrize(
    ("change", "reason", "notice"),
    [
        (lambda db, actor: set_active(db, OPERATOR, actor.name, active=False), "account disabled", "was disabled"),
        (lambda db, actor: change_role(db, OPERATOR, actor.name, "reviewer"), "role changed", "role was changed"),
    ],
)
def test_disabling_or_a_new_role_ends_the_live_session_at_its_next_request(
    db, app_env, clinician, change, reason, notice
):
    app = sign_in(fresh_app(), clinician.name, factories.PASSWORD)
    assert app.session_state[ACTOR] == clinician
    change(db, clinician)
    assert sessions(db)[0].ended_reason == reason
    app.run()
    assert ACTOR not in app.session_state and notice in app.info[0].value
    assert logout_reasons(db)[-1] == reason
    assert app.text_input(key="sign_in_username") is not None


def test_a_session_without_a_token_is_checked_against_the_account_too(db, app_env, clinician):
    app = signed_in(clinician).run()
    assert app.session_state[ACTOR] == clinician
    set_active(db, OPERATOR, clinician.name, active=False)
    app.run()
    assert ACTOR not in app.session_state and logout_reasons(db)[-1] == "account disabled"


def test_the_absolute_lifetime_ends_an_active_session(db, app_env, clinician, monkeypatch):
    monkeypatch.setenv("MEDVQA_WORKBENCH_SESSION_MAX_HOURS", "12")
    app = signed_in(clinician)
    app.session_state[STARTED] = datetime.now(UTC) - timedelta(hours=12, minutes=1)
    app.run()
    assert ACTOR not in app.session_state and "maximum length of 12 hours" in app.info[0].value
    assert logout_reasons(db)[-1] == "session lifetime"
    young = signed_in(clinician)
    young.session_state[STARTED] = datetime.now(UTC) - timedelta(hours=11)
    assert young.run().session_state[ACTOR] == clinician


def test_a_locked_account_is_told_so_in_one_line(db, app_env, clinician):
    for _ in range(5):
        sign_in(fresh_app(), clinician.name, "wrong password here")
    app = sign_in(fresh_app(), clinician.name, factories.PASSWORD)
    assert ACTOR not in app.session_state
    (message,) = errors(app)
    assert message.startswith(f"account {clinician.name!r} is locked after 5 failed sign-ins until ")
