"""Workbench sessions: sign-in through the hospital's identity provider, sign-out, and the idle timeout.

Local accounts sign in with `services.users.authenticate`. With OIDC the provider vouches for the person;
the role still comes from the local account of the same username, so an unknown or disabled person gets in
nowhere. Every sign-in and sign-out is audited.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select

from compliance.policy import Action
from medvqa.db import User
from medvqa.db.engine import Database
from medvqa.errors import AccessDenied
from medvqa.services import audit
from medvqa.services.audit import Actor
from medvqa.services.transaction import write

LOGOUT_REASONS = ("signed out", "idle timeout")


def sign_in_external(db: Database, username: str, provider: str) -> Actor:
    """The Actor of the active local account named `username`, which the provider `provider` vouched for."""
    with db.read_session() as session:
        user = session.scalars(select(User).where(User.username == username)).one_or_none()
    ok = user is not None and user.is_active
    actor = Actor(username, user.role.name if user else "unknown", user.id if user else None)
    details = {"provider": provider}
    outcome = "success" if ok else "failed"
    write(
        db,
        lambda s: audit.record(s, actor, Action.SESSION_LOGIN, "user", actor.user_id, outcome=outcome, details=details),
    )
    if not ok:
        raise AccessDenied(f"{username!r} has no active workbench account; ask an administrator to add one")
    return actor


def sign_out(db: Database, actor: Actor, reason: str = "signed out") -> None:
    """End the session; the trail says whether the person left or the idle timeout ended it."""
    if reason not in LOGOUT_REASONS:
        raise ValueError(f"sign-out reason {reason!r} is not one of {LOGOUT_REASONS}")
    write(
        db,
        lambda s: audit.record(s, actor, Action.SESSION_LOGOUT, "user", actor.user_id, details={"reason": reason}),
    )


def is_idle(last_seen: datetime, now: datetime, timeout_minutes: int) -> bool:
    """True when more than the timeout has passed since the last interaction."""
    return now - last_seen > timedelta(minutes=timeout_minutes)
