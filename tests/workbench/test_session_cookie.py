"""A browser refresh or an opened link keeps the person signed in, through an HttpOnly, SameSite=Strict cookie
that only the server sets and reads; a session that ended, went idle, outlived its lifetime or whose account
changed is never taken up again; addresses name pages and the open study, and a refused page is audited."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update
from starlette.applications import Starlette
from starlette.testclient import TestClient

from medvqa.db import AuditEvent, UserSession
from medvqa.services.sessions import resume_session, session_is_live, sign_out, start_session
from medvqa.services.users import change_role, set_active
from tests import factories
from tests.factories import OPERATOR
from tests.workbench.apptest import fresh_app, sign_in
from workbench import auth, session_cookie
from workbench.auth import ACTOR, TOKEN

ORIGIN = "http://testserver"
IDLE, LIFETIME = 15, timedelta(hours=12)


def resume(db, token, **kwargs):
    return resume_session(db, token, idle_timeout_minutes=IDLE, max_age=LIFETIME, **kwargs)


def events(db, action):
    with db.read_session() as session:
        return session.scalars(select(AuditEvent).where(AuditEvent.action == action)).all()


def age_session(db, *, last_seen=None, created=None):
    values = {}
    if last_seen is not None:
        values["last_seen_at"] = last_seen
    if created is not None:
        values["created_at"] = created
    with db.session() as session, session.begin():
        session.execute(update(UserSession).values(**values))


# --- the server-side rule: which sessions may be taken up again ---


def test_a_live_session_is_resumed_as_its_account_and_the_resume_is_audited(db, clinician):
    token = start_session(db, clinician)
    resumed = resume(db, token, source="10.0.0.7")
    assert resumed is not None and resumed.actor == clinician
    assert datetime.now(UTC) - resumed.started < timedelta(minutes=1)
    (event,) = events(db, "auth:session:resume")
    assert event.actor_name == clinician.name and event.details["source"] == "10.0.0.7"


def test_an_unknown_or_ended_token_resumes_nothing(db, clinician):
    assert resume(db, "not-a-token") is None
    token = start_session(db, clinician)
    sign_out(db, clinician, "signed out", token)
    assert resume(db, token) is None
    assert events(db, "auth:session:resume") == []


@pytest.mark.parametrize(
    ("aging", "reason"),
    [
        ({"last_seen": datetime.now(UTC) - timedelta(minutes=IDLE + 1)}, "idle timeout"),
        ({"created": datetime.now(UTC) - LIFETIME - timedelta(minutes=1)}, "session lifetime"),
    ],
)
def test_an_idle_or_too_old_session_is_ended_not_resumed(db, clinician, aging, reason):
    token = start_session(db, clinician)
    age_session(db, **aging)
    assert resume(db, token) is None
    assert [event.details["reason"] for event in events(db, "auth:session:logout")] == [reason]
    assert resume(db, token) is None  # and stays spent
    assert not session_is_live(db, token, idle_timeout_minutes=IDLE)


@pytest.mark.parametrize(
    "change",
    [
        lambda db, actor: set_active(db, OPERATOR, actor.name, active=False),
        lambda db, actor: change_role(db, OPERATOR, actor.name, "admin"),
    ],
    ids=("disabled", "role-changed"),
)
def test_a_changed_account_never_resumes_its_old_session(db, clinician, change):
    token = start_session(db, clinician)
    change(db, clinician)
    assert resume(db, token) is None


def test_session_is_live_follows_the_record(db, clinician):
    token = start_session(db, clinician)
    assert session_is_live(db, token, idle_timeout_minutes=IDLE)
    assert not session_is_live(db, "other", idle_timeout_minutes=IDLE)
    age_session(db, last_seen=datetime.now(UTC) - timedelta(minutes=IDLE + 1))
    assert not session_is_live(db, token, idle_timeout_minutes=IDLE)


# --- the one-time handoff code ---


def test_a_handoff_code_is_redeemed_once_and_only_in_time():
    code = session_cookie.issue_handoff("token-a", now=100.0)
    assert session_cookie.redeem_handoff(code, now=101.0) == "token-a"
    assert session_cookie.redeem_handoff(code, now=101.0) is None
    late = session_cookie.issue_handoff("token-b", now=100.0)
    assert session_cookie.redeem_handoff(late, now=100.0 + session_cookie.HANDOFF_SECONDS + 1) is None
    assert session_cookie.redeem_handoff("made-up", now=100.0) is None
    assert "token-a" not in code and len(code) >= 40


# --- the endpoints that set, renew and expire the cookie ---


@pytest.fixture
def client(cli_env):
    app = Starlette(routes=session_cookie.routes())
    with TestClient(app, base_url=ORIGIN) as test_client:
        yield test_client


def set_cookie(response) -> str:
    return response.headers["set-cookie"]


def test_claim_sets_an_httponly_strict_cookie_once(db, clinician, client):
    token = start_session(db, clinician)
    code = session_cookie.issue_handoff(token)
    response = client.post("/medvqa-session/claim", headers={"Origin": ORIGIN, session_cookie.HANDOFF_HEADER: code})
    assert response.status_code == 200
    header = set_cookie(response)
    assert header.startswith(f"medvqa_session={token};")
    assert {"HttpOnly", "SameSite=Strict", "Path=/", f"Max-Age={IDLE * 60}"} <= set(header.split("; "))
    assert "Secure" not in header  # plain http (a TLS deployment gets Secure: below)
    again = client.post("/medvqa-session/claim", headers={"Origin": ORIGIN, session_cookie.HANDOFF_HEADER: code})
    assert again.status_code == 403 and "set-cookie" not in again.headers


@pytest.mark.parametrize(
    "headers",
    [{}, {"Origin": "http://evil.example"}, {"Origin": "null"}],
    ids=("no-origin", "other-site", "opaque-origin"),
)
def test_claim_refuses_a_request_from_anywhere_but_the_page(db, clinician, client, headers):
    code = session_cookie.issue_handoff(start_session(db, clinician))
    response = client.post("/medvqa-session/claim", headers={**headers, session_cookie.HANDOFF_HEADER: code})
    assert response.status_code == 403 and "set-cookie" not in response.headers
    assert client.get("/medvqa-session/claim").status_code == 405  # never a GET: a link or an <img> cannot claim


def test_the_cookie_is_secure_behind_tls(db, clinician, client):
    code = session_cookie.issue_handoff(start_session(db, clinician))
    headers = {"Origin": ORIGIN, session_cookie.HANDOFF_HEADER: code, "X-Forwarded-Proto": "https"}
    assert "Secure" in set_cookie(client.post("/medvqa-session/claim", headers=headers)).split("; ")


def test_renew_slides_a_live_cookie_and_expires_a_dead_one(db, clinician, client):
    token = start_session(db, clinician)
    client.cookies.set(session_cookie.COOKIE, token)
    live = client.post("/medvqa-session/renew", headers={"Origin": ORIGIN})
    assert live.status_code == 200 and set_cookie(live).startswith(f"medvqa_session={token};")
    sign_out(db, clinician, "signed out", token)
    client.cookies.set(session_cookie.COOKIE, token)
    dead = client.post("/medvqa-session/renew", headers={"Origin": ORIGIN})
    assert (
        dead.status_code == 403 and set_cookie(dead).startswith("medvqa_session=;") and "Max-Age=0" in set_cookie(dead)
    )


def test_end_expires_the_cookie(client):
    response = client.post("/medvqa-session/end", headers={"Origin": ORIGIN})
    assert response.status_code == 200 and "Max-Age=0" in set_cookie(response)


def test_the_page_scripts_post_to_our_own_origin_and_never_carry_the_token():
    script = session_cookie.script("claim", "CODE123")
    assert "window.location.origin" in script and "'POST'" in script and "CODE123" in script
    with pytest.raises(ValueError, match="unknown cookie action"):
        session_cookie.script("steal")


# --- the app: refresh, links, the refused page ---


def cookie_scripts(app) -> list[str]:
    return [element.proto.body for element in app.get("html")]


def test_a_new_browser_session_with_the_cookie_is_signed_in_on_the_same_page(db, app_env, clinician, monkeypatch):
    first = sign_in(fresh_app(), clinician.name, factories.PASSWORD)
    token = first.session_state[TOKEN]
    claims = [body for body in cookie_scripts(first) if "/medvqa-session/claim" in body]
    assert len(claims) == 1 and token not in claims[0]  # the page sets the cookie from a one-time code
    monkeypatch.setattr(auth, "session_cookie_token", lambda: token)
    refreshed = fresh_app().run()
    assert refreshed.session_state[ACTOR] == clinician and refreshed.session_state[TOKEN] == token
    assert any(title.value == "Ask" for title in refreshed.title)
    assert [event.actor_name for event in events(db, "auth:session:resume")] == [clinician.name]


def test_a_spent_cookie_shows_the_sign_in_form_with_a_notice(db, app_env, clinician, monkeypatch):
    token = start_session(db, clinician)
    sign_out(db, clinician, "signed out", token)
    monkeypatch.setattr(auth, "session_cookie_token", lambda: token)
    app = fresh_app().run()
    assert ACTOR not in app.session_state and "earlier session has ended" in app.info[0].value
    assert app.text_input(key="sign_in_username") is not None
    assert any("/medvqa-session/end" in body for body in cookie_scripts(app))


def test_sign_out_asks_the_browser_to_expire_the_cookie(db, app_env, clinician):
    app = sign_in(fresh_app(), clinician.name, factories.PASSWORD)
    app.button(key="sign_out").click().run()
    assert ACTOR not in app.session_state
    assert any("/medvqa-session/end" in body for body in cookie_scripts(app))


def test_a_link_to_a_page_the_role_may_not_open_shows_the_audited_refusal(db, app_env, clinician):
    app = sign_in(fresh_app(), clinician.name, factories.PASSWORD)
    app.switch_page("app_pages/audit.py")
    app.run()
    assert any("Refused" in element.value for element in app.error)
    denied = [e for e in events(db, "audit:event:read") if e.outcome == "denied"]
    assert [event.actor_name for event in denied] == [clinician.name]
