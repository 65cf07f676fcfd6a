"""Who is signed in: the sign-in form (local accounts, or the hospital's OIDC provider through st.login),
the server-side session checks on every request (idle timeout, absolute lifetime, account disabled or role
changed), taking a session up again after a browser refresh (the HttpOnly cookie of workbench/session_cookie.py),
sign-out, and the role check every page and button goes through."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import streamlit as st

from medvqa.errors import AccessDenied, MedVQAError
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.sessions import (
    check_session,
    is_idle,
    resume_session,
    sign_in_external,
    sign_out,
    start_session,
)
from medvqa.services.users import ThrottleSettings, authenticate
from workbench import resources, session_cookie

ACTOR = "medvqa_actor"
LAST_SEEN = "medvqa_last_seen"
STARTED = "medvqa_session_started"
TOKEN = "medvqa_session_token"
NOTICE = "medvqa_notice"
DONE = "medvqa_done"
RESUME_TRIED = "medvqa_resume_tried"
COOKIE_ACTION = "medvqa_cookie_action"  # (action, handoff code or None) for the page's next run
COOKIE_RENEWED = "medvqa_cookie_renewed"
COOKIE_RENEW_EVERY = timedelta(minutes=1)
T = TypeVar("T")


def current_actor() -> Actor | None:
    actor = st.session_state.get(ACTOR)
    return actor if isinstance(actor, Actor) else None


def oidc_configured() -> bool:
    """True when the hospital configured a provider: an [auth] section in .streamlit/secrets.toml."""
    try:
        return "auth" in st.secrets
    except Exception:  # no secrets file at all: Streamlit raises its own not-found error
        return False


def client_address() -> str | None:
    """The browser's address as Streamlit sees it (None for connections through localhost)."""
    try:
        address = st.context.ip_address
    except Exception:  # outside a browser session (AppTest) there is no request to ask
        return None
    return str(address) if address else None


def _notice(reason: str) -> str:
    current = resources.settings()
    return {
        "idle timeout": f"You were signed out after {current.workbench_idle_timeout_minutes} minutes without activity.",
        "session lifetime": f"Your session reached its maximum length of {current.workbench_session_max_hours:g} "
        "hours; please sign in again.",
        "account disabled": "Your account was disabled; you were signed out.",
        "role changed": "Your role was changed; please sign in again.",
    }.get(reason, "Your session was ended; please sign in again.")


def enforce_session() -> None:
    """On every request, before anything else runs: sign out a session idle for longer than
    MEDVQA_WORKBENCH_IDLE_TIMEOUT_MINUTES, older than MEDVQA_WORKBENCH_SESSION_MAX_HOURS, whose account was
    disabled or given another role, or that was ended elsewhere; else note this visit."""
    actor, now = current_actor(), datetime.now(UTC)
    if actor is None:
        return
    current = resources.settings()
    last_seen = st.session_state.get(LAST_SEEN, now)
    started = st.session_state.setdefault(STARTED, now)
    reason = "idle timeout" if is_idle(last_seen, now, current.workbench_idle_timeout_minutes) else None
    if reason is None:
        max_age = timedelta(hours=current.workbench_session_max_hours)
        check = check_session(
            resources.database(), actor, st.session_state.get(TOKEN), started, max_age=max_age, now=now
        )
        reason = check.ended_reason
    if reason is not None:
        end_session(reason)
        st.session_state[NOTICE] = _notice(reason)
        return
    st.session_state[LAST_SEEN] = now
    if now - st.session_state.get(COOKIE_RENEWED, now) >= COOKIE_RENEW_EVERY:
        _cookie_action("renew")  # the cookie's Max-Age slides with the person's activity


def still_signed_in() -> bool:
    """For a fragment's own reruns, which skip the app's script: the same session checks (idle timeout,
    lifetime, account disabled or role changed, ended elsewhere) before the fragment acts."""
    enforce_session()
    return current_actor() is not None


def session_cookie_token() -> str | None:
    """The session token the browser sent in its cookie (None outside a browser, or without one)."""
    try:
        token = st.context.cookies.get(session_cookie.COOKIE)
    except Exception:  # outside a browser session (AppTest) there is no request to ask
        return None
    return token if isinstance(token, str) and token else None  # AppTest's stand-in request holds mocks


def resume_from_cookie() -> None:
    """Once per browser session, before anything else: a refresh or an opened link takes up the server-side
    session its cookie names, when that is still live; a spent cookie is expired."""
    if current_actor() is not None or st.session_state.get(RESUME_TRIED):
        return
    st.session_state[RESUME_TRIED] = True
    token = session_cookie_token()
    if token is None:
        return
    current = resources.settings()
    resumed = attempt(
        lambda: resume_session(
            resources.database(),
            token,
            idle_timeout_minutes=current.workbench_idle_timeout_minutes,
            max_age=timedelta(hours=current.workbench_session_max_hours),
            source=client_address(),
        )
    )
    if resumed is None:
        _cookie_action("end")
        st.session_state[NOTICE] = "Your earlier session has ended; please sign in again."
        return
    now = datetime.now(UTC)
    st.session_state[ACTOR] = resumed.actor
    st.session_state[TOKEN] = token
    st.session_state[STARTED] = resumed.started
    st.session_state[LAST_SEEN] = now
    _cookie_action("renew")


def _cookie_action(action: str, code: str | None = None) -> None:
    st.session_state[COOKIE_ACTION] = (action, code)
    if action != "end":
        st.session_state[COOKIE_RENEWED] = datetime.now(UTC)


def sync_cookie() -> None:
    """Run the pending cookie step in the browser (claim after sign-in, renew, or end), once."""
    pending = st.session_state.pop(COOKIE_ACTION, None)
    if pending is not None:
        action, code = pending
        st.html(session_cookie.script(action, code), unsafe_allow_javascript=True)


def begin_session(actor: Actor) -> None:
    token = start_session(resources.database(), actor)
    st.session_state[ACTOR] = actor
    st.session_state[TOKEN] = token
    st.session_state[LAST_SEEN] = st.session_state[STARTED] = datetime.now(UTC)
    _cookie_action("claim", session_cookie.issue_handoff(token))


def end_session(reason: str = "signed out") -> None:
    """Audit the sign-out, forget everything this session held (answers, keys, filters), and expire the
    session cookie in the browser."""
    actor = current_actor()
    if actor is not None:
        sign_out(resources.database(), actor, reason, st.session_state.get(TOKEN))
    for key in list(st.session_state.keys()):
        del st.session_state[key]
    st.session_state[RESUME_TRIED] = True  # the browser still sent the old cookie: never take it up again
    _cookie_action("end")
    if oidc_configured() and getattr(st.user, "is_logged_in", False):
        st.logout()


def sign_in_page() -> None:
    """The sign-in form; the only page shown until someone signs in."""
    st.title("medvqa workbench")
    if NOTICE in st.session_state:
        st.info(st.session_state.pop(NOTICE))
    if oidc_configured():
        _oidc_sign_in()
    with st.form("sign_in"):
        username = st.text_input("Username", key="sign_in_username")
        password = st.text_input("Password", type="password", key="sign_in_password")
        submitted = st.form_submit_button("Sign in")
    if submitted:
        try:
            throttle = ThrottleSettings.from_settings(resources.settings())
            actor = authenticate(resources.database(), username.strip(), password, client_address(), throttle)
        except MedVQAError as exc:
            st.error(str(exc))
            return
        begin_session(actor)
        st.rerun()


def _oidc_sign_in() -> None:
    """Sign in through the configured provider; the local account of the same username gives the role."""
    if not getattr(st.user, "is_logged_in", False):
        st.button("Sign in with the hospital account", on_click=st.login)
        return
    username = str(st.user.get("preferred_username") or st.user.get("email") or "")
    try:
        begin_session(sign_in_external(resources.database(), username, "oidc", client_address()))
    except MedVQAError as exc:
        st.error(str(exc))
        return
    st.rerun()


def require(action: str, object_type: str = "page") -> Actor:
    """The signed-in actor when the role may perform `action`; otherwise the audited refusal and a stop."""
    actor = current_actor()
    if actor is None:
        st.warning("Please sign in.")
        st.stop()
    try:
        authorize(resources.database(), actor, action, object_type)
    except AccessDenied as exc:
        st.error(f"Refused: {exc}")
        st.stop()
    return actor


def attempt(work: Callable[[], T]) -> T | None:
    """Run a service call; an expected failure becomes one error line on the page and None."""
    try:
        return work()
    except MedVQAError as exc:
        st.error(str(exc))
        return None


def perform(work: Callable[[], Any], notice: str) -> bool:
    """Run a state-changing service call; on success keep `notice` for the next run and rerun the page (so it
    shows the new state), on an expected failure show one error line."""
    try:
        work()
    except MedVQAError as exc:
        st.error(str(exc))
        return False
    st.session_state[DONE] = notice
    st.rerun()


def show_notice() -> None:
    """The success message kept by `perform` across its rerun."""
    if DONE in st.session_state:
        st.success(st.session_state.pop(DONE))
