"""Workbench sessions: sign-in through the hospital's identity provider, the server-side session record, its
checks on every request (account disabled, role changed, idle, absolute lifetime, ended elsewhere), sign-out.

Local accounts sign in with `services.users.authenticate`. With OIDC the provider vouches for the person;
the role still comes from the local account of the same username, so an unknown or disabled person gets in
nowhere. Every sign-in and sign-out is audited.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from compliance.policy import Action
from medvqa.db import User, UserSession
from medvqa.db.base import utcnow
from medvqa.db.engine import Database
from medvqa.errors import AccessDenied
from medvqa.services import audit
from medvqa.services.audit import Actor, bounded
from medvqa.services.transaction import write
from medvqa.services.users import USERNAME_PATTERN

LOGOUT_REASONS = (
    "signed out",
    "idle timeout",
    "session lifetime",
    "account disabled",
    "role changed",
    "session ended",
)
TOUCH_EVERY = timedelta(minutes=1)  # how often a live session's last_seen_at is written


def sign_in_external(db: Database, username: str, provider: str, source: str | None = None) -> Actor:
    """The Actor of the active local account named `username`, which the provider `provider` vouched for."""
    with db.read_session() as session:
        lookup = username if USERNAME_PATTERN.match(username) else None
        user = session.scalars(select(User).where(User.username == lookup)).one_or_none() if lookup else None
    ok = user is not None and user.is_active
    actor = Actor(username, user.role.name if user else "unknown", user.id if user else None)
    details = {"provider": provider, "source": source or "local"}
    outcome = "success" if ok else "failed"
    write(
        db,
        lambda s: audit.record(s, actor, Action.SESSION_LOGIN, "user", actor.user_id, outcome=outcome, details=details),
    )
    if not ok:
        raise AccessDenied(
            f"{bounded(username, 64)!r} has no active workbench account; ask an administrator to add one"
        )
    return actor


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def start_session(db: Database, actor: Actor) -> str:
    """A server-side session record for a signed-in account; returns its token (only its hash is stored)."""
    if actor.user_id is None:
        raise AccessDenied("only accounts have workbench sessions")
    token = secrets.token_urlsafe(32)
    now = utcnow()

    def work(session: Session) -> None:
        session.add(UserSession(user_id=actor.user_id, token_hash=_token_hash(token), created_at=now, last_seen_at=now))

    write(db, work)
    return token


@dataclass(frozen=True)
class SessionCheck:
    """The outcome of a request's session check: the actor to go on as, or why the session ended."""

    actor: Actor | None
    ended_reason: str | None = None


def check_session(
    db: Database,
    actor: Actor,
    token: str | None,
    started: datetime,
    *,
    max_age: timedelta,
    now: datetime | None = None,
) -> SessionCheck:
    """Whether `actor`'s session may go on: the account is still active and has the same role, the session
    is younger than `max_age` and was not ended elsewhere (by an administrator disabling the account or
    changing its role). The idle timeout is checked by the caller, which sees every interaction."""
    now = now or utcnow()
    with db.read_session() as session:
        user = session.get(User, actor.user_id) if actor.user_id is not None else None
        record = _record(session, token)
        role = user.role.name if user else None
        active = bool(user and user.is_active)
        ended_reason = record.ended_reason if record is not None and record.ended_at is not None else None
        created = _aware(record.created_at) if record is not None else started
        last_seen = _aware(record.last_seen_at) if record is not None else None
    reason = None
    if not active:
        reason = "account disabled"
    elif role != actor.role:
        reason = "role changed"
    elif ended_reason is not None:
        reason = ended_reason if ended_reason in LOGOUT_REASONS else "session ended"
    elif now - min(created, started) > max_age:
        reason = "session lifetime"
    if reason is not None:
        return SessionCheck(None, reason)
    if record is not None and last_seen is not None and now - last_seen > TOUCH_EVERY:
        _touch(db, token, now)
    return SessionCheck(actor)


def _record(session: Session, token: str | None) -> UserSession | None:
    if not token:
        return None
    return session.scalars(select(UserSession).where(UserSession.token_hash == _token_hash(token))).one_or_none()


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _touch(db: Database, token: str | None, now: datetime) -> None:
    def work(session: Session) -> None:
        record = _record(session, token)
        if record is not None and record.ended_at is None:
            record.last_seen_at = now

    write(db, work)


def sign_out(db: Database, actor: Actor, reason: str = "signed out", token: str | None = None) -> None:
    """End the session; the trail says whether the person left, or what ended it."""
    if reason not in LOGOUT_REASONS:
        raise ValueError(f"sign-out reason {reason!r} is not one of {LOGOUT_REASONS}")

    def work(session: Session) -> None:
        record = _record(session, token)
        if record is not None and record.ended_at is None:
            record.ended_at, record.ended_reason = utcnow(), reason
        audit.record(session, actor, Action.SESSION_LOGOUT, "user", actor.user_id, details={"reason": reason})

    write(db, work)


def is_idle(last_seen: datetime, now: datetime, timeout_minutes: int) -> bool:
    """True when more than the timeout has passed since the last interaction."""
    return now - last_seen > timedelta(minutes=timeout_minutes)


@dataclass(frozen=True)
class Resumed:
    """A session taken up again from its token (a browser refresh or an opened link): who, and since when."""

    actor: Actor
    started: datetime


def resume_session(
    db: Database,
    token: str,
    *,
    idle_timeout_minutes: int,
    max_age: timedelta,
    source: str | None = None,
    now: datetime | None = None,
) -> Resumed | None:
    """The session whose token the browser presented, when it may go on: not ended, its account active with
    the role it signed in with, neither idle for longer than the timeout nor older than `max_age`. A session
    found past its idle timeout or lifetime is ended here (and audited), so its token is spent. Resuming is
    audited (`auth:session:resume`) and counts as activity. None when there is nothing to resume."""
    now = now or utcnow()
    with db.read_session() as session:
        record = _record(session, token)
        if record is None or record.ended_at is not None:
            return None
        user = session.get(User, record.user_id)
        if user is None:
            return None
        actor = Actor(user.username, user.role.name, user.id)
        active = user.is_active
        created, last_seen = _aware(record.created_at), _aware(record.last_seen_at)
    reason = None
    if not active:
        reason = "account disabled"
    elif is_idle(last_seen, now, idle_timeout_minutes):
        reason = "idle timeout"
    elif now - created > max_age:
        reason = "session lifetime"
    if reason is not None:
        sign_out(db, actor, reason, token)
        return None

    def work(session: Session) -> None:
        current = _record(session, token)
        if current is not None and current.ended_at is None:
            current.last_seen_at = now
        details = {"source": source or "local"}
        audit.record(session, actor, Action.SESSION_RESUME, "user", actor.user_id, details=details)

    write(db, work)
    return Resumed(actor, created)


def session_is_live(db: Database, token: str, *, idle_timeout_minutes: int, now: datetime | None = None) -> bool:
    """Whether the token names a session that has not ended and is not idle (the cookie may be renewed)."""
    now = now or utcnow()
    with db.read_session() as session:
        record = _record(session, token)
        if record is None or record.ended_at is not None:
            return False
        return not is_idle(_aware(record.last_seen_at), now, idle_timeout_minutes)
