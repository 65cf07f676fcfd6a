"""Sign-in, navigation by role, refusals, idle timeout and sign-out through AppTest."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from medvqa.db import AuditEvent
from tests import factories
from tests.workbench.apptest import errors, fresh_app, sign_in, signed_in
from workbench.auth import ACTOR, LAST_SEEN

PAGE_TITLES = {
    "clinician": ["Ask"],
    "reviewer": ["Ask", "Review"],
    "ml_engineer": ["Models and rounds"],
    "auditor": ["Audit"],
    "admin": ["Models and rounds", "Audit"],
}


def audit_rows(db, **where):
    with db.read_session() as session:
        query = select(AuditEvent).order_by(AuditEvent.seq)
        for column, value in where.items():
            query = query.where(getattr(AuditEvent, column) == value)
        return session.scalars(query).all()


def test_sign_in_with_a_local_account_then_sign_out(db, app_env, clinician):
    app = sign_in(fresh_app(), clinician.name, factories.PASSWORD)
    assert not app.exception and app.session_state[ACTOR] == clinician
    assert app.title[0].value == "Ask"
    app.button(key="sign_out").click().run()
    assert ACTOR not in app.session_state and app.text_input(key="sign_in_username") is not None
    assert [(e.action, e.outcome) for e in audit_rows(db, actor_name=clinician.name)][-2:] == [
        ("auth:session:login", "success"),
        ("auth:session:logout", "success"),
    ]


def test_a_wrong_password_is_refused_in_one_line_and_audited(db, app_env, clinician):
    app = sign_in(fresh_app(), clinician.name, "wrong password here")
    assert ACTOR not in app.session_state
    assert errors(app) == ["sign-in failed: unknown user, wrong password, or disabled account"]
    assert audit_rows(db, actor_name=clinician.name)[-1].outcome == "failed"


@pytest.mark.parametrize("role", list(PAGE_TITLES))
def test_navigation_lists_only_the_pages_a_role_may_open(db, app_env, role):
    actor = factories.make_user(db, role)
    app = signed_in(actor).run()
    assert not app.exception
    # the first allowed page opens; its title is the page's
    assert app.title[0].value.startswith(PAGE_TITLES[role][0].split()[0])


@pytest.mark.parametrize(
    ("page", "role", "action"),
    [
        ("app_pages/audit.py", "clinician", "audit:event:read"),
        ("app_pages/review.py", "clinician", "answer:review:create"),
        ("app_pages/models.py", "reviewer", "model:adapter:read"),
        ("app_pages/ask.py", "auditor", "answer:question:ask"),
    ],
)
def test_a_page_opened_without_the_role_is_refused_with_the_reason_and_audited(db, app_env, page, role, action):
    actor = factories.make_user(db, role)
    from workbench import APP_PATH

    app = AppTest.from_file(str(APP_PATH.parent / page), default_timeout=60)
    app.session_state[ACTOR] = actor
    app.run()
    assert errors(app) == [f"Refused: {actor.name}: role {role!r} may not perform {action}"]
    denied = audit_rows(db, actor_name=actor.name, outcome="denied")
    assert [e.action for e in denied] == [action]


def test_an_idle_session_is_signed_out_on_the_server(db, app_env, clinician, monkeypatch):
    monkeypatch.setenv("MEDVQA_WORKBENCH_IDLE_TIMEOUT_MINUTES", "5")
    app = signed_in(clinician)
    app.session_state[LAST_SEEN] = datetime.now(UTC) - timedelta(minutes=6)
    app.run()
    assert ACTOR not in app.session_state
    assert "signed out after 5 minutes" in app.info[0].value
    assert audit_rows(db, action="auth:session:logout")[-1].details == {"reason": "idle timeout"}
    active = signed_in(clinician)
    active.session_state[LAST_SEEN] = datetime.now(UTC) - timedelta(minutes=4)
    assert active.run().session_state[ACTOR] == clinician


def test_without_an_auth_section_in_secrets_only_local_sign_in_is_offered(db, app_env):
    app = fresh_app().run()
    labels = [button.label for button in app.button]
    assert labels == ["Sign in"]  # no "Sign in with the hospital account": st.login is not wired without [auth]


def test_with_an_auth_section_in_secrets_the_hospital_sign_in_is_offered(db, app_env):
    app = fresh_app()
    app.secrets["auth"] = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "x" * 32}
    app.run()
    labels = [button.label for button in app.button]
    assert labels == ["Sign in with the hospital account", "Sign in"]  # local accounts keep working beside it
