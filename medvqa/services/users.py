"""User accounts: create, list, disable, enable, change role, unlock (admin), and sign in.

Passwords are stored as argon2id hashes only. Sign-in is throttled per account name and per source address
(`sign_in_attempts` keeps keyed hashes of both, never the name or address): after
MEDVQA_SIGN_IN_MAX_FAILURES failures within the window the name is locked for the lockout time, whether or not
an account of that name exists, so neither the message nor the time it takes tells who has an account.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from compliance.policy import DEMO_PASSWORD, Action, Role
from medvqa.config import Settings, load_settings
from medvqa.db import Role as RoleRow
from medvqa.db import SignInAttempt, User, UserSession
from medvqa.db.base import utcnow
from medvqa.db.engine import Database
from medvqa.errors import AccessDenied, InvalidInput, NotFound
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.audit import Actor, bounded
from medvqa.services.transaction import write

USERNAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")
MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024  # argon2 hashes any length; a megabyte password is an attack, not a password
LOCAL_SOURCE = "local"  # the command line, or the workbench reached through localhost
FAILED = "sign-in failed: unknown user, wrong password, or disabled account"
_hasher = PasswordHasher()
# Verified against when the username is unknown, so that a wrong name and a wrong password take as long.
_DUMMY_HASH = _hasher.hash("medvqa-timing-equaliser")


@dataclass(frozen=True)
class ThrottleSettings:
    max_failures: int = 5
    source_max_failures: int = 20
    window: timedelta = timedelta(minutes=15)
    lockout: timedelta = timedelta(minutes=15)

    @classmethod
    def from_settings(cls, settings: Settings) -> ThrottleSettings:
        return cls(
            settings.sign_in_max_failures,
            settings.sign_in_source_max_failures,
            timedelta(minutes=settings.sign_in_window_minutes),
            timedelta(minutes=settings.sign_in_lockout_minutes),
        )


def check_password_policy(username: str, password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise InvalidInput(f"the password must have at most {MAX_PASSWORD_LENGTH} characters")
    if username.lower() in password.lower():
        raise InvalidInput("the password must not contain the username")


def _check_role(role: str) -> None:
    if role not in set(Role):
        raise InvalidInput(f"role {role!r} does not exist; choose one of: {', '.join(Role)}")


def add_user(db: Database, actor: Actor, username: str, password: str, role: str, display_name: str = "") -> User:
    """Create an account; the audit event names the user and role, never the password."""
    authorize(db, actor, Action.USER_CREATE, "user", username)
    if not USERNAME_PATTERN.match(username):
        raise InvalidInput(
            f"username {bounded(username, 64)!r}: use 2-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    _check_role(role)
    if len(display_name) > 128 or not display_name.isprintable():
        raise InvalidInput("the display name must be printable and at most 128 characters")
    check_password_policy(username, password)
    password_hash = _hasher.hash(password)  # slow on purpose: done before the write lock is taken

    def work(session: Session) -> User:
        if session.scalar(select(User.id).where(User.username == username)) is not None:
            raise InvalidInput(f"user {username!r} already exists")
        role_row = session.scalars(select(RoleRow).where(RoleRow.name == role)).one()
        user = User(
            username=username,
            display_name=display_name or username,
            role=role_row,
            password_hash=password_hash,
        )
        session.add(user)
        session.flush()
        audit.record(session, actor, Action.USER_CREATE, "user", user.id, details={"username": username, "role": role})
        return user

    try:
        return write(db, work)
    except IntegrityError:
        raise InvalidInput(f"user {username!r} already exists") from None


def list_users(db: Database, actor: Actor, settings: Settings | None = None) -> list[dict[str, Any]]:
    """Accounts with role, state, and until when a lockout holds (None when not locked)."""
    authorize(db, actor, Action.USER_LIST, "user")
    throttle = ThrottleSettings.from_settings(settings) if settings else ThrottleSettings()
    now = utcnow()
    with db.read_session() as session:
        users = session.scalars(select(User).order_by(User.id)).all()
        return [
            {
                "id": u.id,
                "username": u.username,
                "role": u.role.name,
                "active": u.is_active,
                "locked_until": _iso(_locked_until(session, _name_key(u.username), now, throttle)),
            }
            for u in users
        ]


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _account(session: Session, username: str) -> User:
    user = session.scalars(select(User).where(User.username == username)).one_or_none()
    if user is None:
        raise NotFound(f"user {bounded(username, 64)!r} does not exist")
    return user


def _end_sessions(session: Session, user_id: int, reason: str) -> int:
    ended = session.execute(
        update(UserSession)
        .where(UserSession.user_id == user_id, UserSession.ended_at.is_(None))
        .values(ended_at=utcnow(), ended_reason=reason)
    )
    return int(getattr(ended, "rowcount", 0) or 0)


def set_active(db: Database, actor: Actor, username: str, active: bool) -> None:
    """Disable (or enable again) an account. Disabling ends its workbench sessions at their next request."""
    action = Action.USER_ENABLE if active else Action.USER_DISABLE
    authorize(db, actor, action, "user", username)

    def work(session: Session) -> None:
        user = _account(session, username)
        if user.is_active == active:
            raise InvalidInput(f"user {username!r} is already {'enabled' if active else 'disabled'}")
        user.is_active = active
        ended = 0 if active else _end_sessions(session, user.id, "account disabled")
        audit.record(session, actor, action, "user", user.id, details={"username": username, "sessions_ended": ended})

    write(db, work)


def change_role(db: Database, actor: Actor, username: str, role: str) -> None:
    """Give an account another role; its workbench sessions end at their next request."""
    authorize(db, actor, Action.USER_CHANGE_ROLE, "user", username)
    _check_role(role)

    def work(session: Session) -> None:
        user = _account(session, username)
        old = user.role.name
        if old == role:
            raise InvalidInput(f"user {username!r} already has the role {role}")
        user.role = session.scalars(select(RoleRow).where(RoleRow.name == role)).one()
        ended = _end_sessions(session, user.id, "role changed")
        details = {"username": username, "old": old, "new": role, "sessions_ended": ended}
        audit.record(session, actor, Action.USER_CHANGE_ROLE, "user", user.id, details=details)

    write(db, work)


def unlock(db: Database, actor: Actor, username: str) -> None:
    """Lift a lockout of the account name (the failures before it no longer count)."""
    authorize(db, actor, Action.USER_UNLOCK, "user", username)

    def work(session: Session) -> None:
        user = _account(session, username)
        session.add(SignInAttempt(ts=utcnow(), username_key=_name_key(username), source_key="", kind="unlock"))
        audit.record(session, actor, Action.USER_UNLOCK, "user", user.id, details={"username": username})

    write(db, work)


# -------------------------------------------------------------------------------------------------- sign-in


def _key(kind: str, value: str) -> str:
    return hashlib.sha256(f"medvqa-sign-in\x00{kind}\x00{value}".encode("utf-8", "surrogatepass")).hexdigest()


def _name_key(username: str) -> str:
    return _key("name", username.strip().lower())


def _source_key(source: str) -> str:
    return _key("source", source)


def is_local(source: str | None) -> bool:
    """True for the command line and for connections from this machine (Streamlit reports None for them)."""
    if source in (None, "", LOCAL_SOURCE):
        return True
    try:
        return ipaddress.ip_address(str(source).split("%")[0]).is_loopback
    except ValueError:
        return False


def _locked_until(session: Session, name_key: str, now: datetime, throttle: ThrottleSettings) -> datetime | None:
    """Until when the name is locked: max_failures failures within the window, none since the last success or
    unlock, the lock lasting `lockout` from the last of them."""
    reset = session.scalar(
        select(func.max(SignInAttempt.ts)).where(
            SignInAttempt.username_key == name_key, SignInAttempt.kind.in_(("success", "unlock"))
        )
    )
    return _lock_end(session, SignInAttempt.username_key == name_key, now, reset, throttle.max_failures, throttle)


def _blocked_until(session: Session, source_key: str, now: datetime, throttle: ThrottleSettings) -> datetime | None:
    """Until when a source address is blocked; successes from it do not reset its count (an attacker with one
    valid account could otherwise interleave sign-ins to keep guessing)."""
    where = SignInAttempt.source_key == source_key
    return _lock_end(session, where, now, None, throttle.source_max_failures, throttle)


def _lock_end(
    session: Session, where: Any, now: datetime, reset: datetime | None, limit: int, throttle: ThrottleSettings
) -> datetime | None:
    since = now - throttle.window
    if reset is not None:
        reset = _aware(reset)
        since = max(since, reset)
    failures = session.scalars(
        select(SignInAttempt.ts)
        .where(where, SignInAttempt.kind == "failure", SignInAttempt.ts > since)
        .order_by(SignInAttempt.ts.desc())
        .limit(limit)
    ).all()
    if len(failures) < limit:
        return None
    until = _aware(failures[0]) + throttle.lockout
    return until if until > now else None


def _aware(moment: datetime) -> datetime:
    """SQLite hands timestamps back without their (UTC) zone."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _clock(moment: datetime) -> str:
    return moment.strftime("%H:%M UTC on %Y-%m-%d")


def authenticate(
    db: Database,
    username: str,
    password: str,
    source: str | None = LOCAL_SOURCE,
    throttle: ThrottleSettings | None = None,
) -> Actor:
    """Sign in: the Actor of an active account whose password matches. Every attempt is audited (the name as
    typed, cut and hashed when it is long or not printable); failures count towards a lockout of the name
    and a block of the source address. A locked name or blocked source is refused without checking the
    password, whether or not the account exists."""
    throttle = throttle or ThrottleSettings.from_settings(load_settings())
    source = source or LOCAL_SOURCE
    now = utcnow()
    name_key, source_key = _name_key(username), _source_key(source)
    lookup = username if USERNAME_PATTERN.match(username) else None  # no account has any other name
    with db.read_session() as session:
        user = session.scalars(select(User).where(User.username == lookup)).one_or_none() if lookup else None
        blocked = _blocked_until(session, source_key, now, throttle)
        locked = None if blocked else _locked_until(session, name_key, now, throttle)
    actor = Actor(username, user.role.name if user else "unknown", user.id if user else None)
    details: dict[str, Any] = {"source": source}
    if blocked is not None:
        details["reason"] = "source blocked"
        _audit_attempt(db, actor, "denied", details)
        raise AccessDenied(f"too many failed sign-ins from this address: try again after {_clock(blocked)}")
    if locked is not None:
        details["reason"] = "account locked"
        _audit_attempt(db, actor, "denied", details)
        raise AccessDenied(
            f"account {bounded(username, 64)!r} is locked after {throttle.max_failures} failed sign-ins until "
            f"{_clock(locked)}; an administrator can unlock it"
        )
    if password == DEMO_PASSWORD and not is_local(source):
        details["reason"] = "demo password from another machine"
        _audit_attempt(db, actor, "failed", details, name_key, source_key)
        raise AccessDenied("the published demo password signs in from this machine only")
    ok = _password_matches(user.password_hash if user else _DUMMY_HASH, password)
    ok = ok and user is not None and user.is_active
    lock = _audit_attempt(db, actor, "success" if ok else "failed", details, name_key, source_key, throttle)
    if not ok:
        raise AccessDenied(FAILED + (f"; the account is now locked until {_clock(lock)}" if lock else ""))
    return actor


def _audit_attempt(
    db: Database,
    actor: Actor,
    outcome: str,
    details: dict[str, Any],
    name_key: str | None = None,
    source_key: str | None = None,
    throttle: ThrottleSettings | None = None,
) -> datetime | None:
    """The attempt's audit event (and its throttling row); a failure that reaches the limit also records the
    lockout. Returns the end of a lockout this attempt started."""

    def work(session: Session) -> datetime | None:
        now = utcnow()
        if name_key is not None and source_key is not None:
            kind = "success" if outcome == "success" else "failure"
            session.add(SignInAttempt(ts=now, username_key=name_key, source_key=source_key, kind=kind))
            session.flush()
        audit.record(session, actor, Action.SESSION_LOGIN, "user", actor.user_id, outcome=outcome, details=details)
        if outcome != "failed" or throttle is None or name_key is None:
            return None
        until = _locked_until(session, name_key, now, throttle)
        if until is not None:
            lockout = {"until": until.isoformat(), "failures": throttle.max_failures, "source": details["source"]}
            audit.record(
                session, actor, Action.ACCOUNT_LOCKOUT, "user", actor.user_id, outcome="denied", details=lockout
            )
        return until

    return write(db, work)


def reauthenticate(
    db: Database,
    actor: Actor,
    password: str,
    action: str,
    object_type: str,
    object_id: object,
    failure_details: dict[str, Any],
    throttle: ThrottleSettings | None = None,
) -> str:
    """The signed-in account's printed name once its password, entered again (an electronic signature,
    21 CFR 11.200), matches. A locked account signs nothing; a wrong password is audited as a failed `action`
    and counts towards the lockout like a failed sign-in."""
    throttle = throttle or ThrottleSettings.from_settings(load_settings())
    name_key, now = _name_key(actor.name), utcnow()
    with db.read_session() as session:
        user = session.get(User, actor.user_id) if actor.user_id is not None else None
        locked = _locked_until(session, name_key, now, throttle)
        name, stored = (user.display_name or user.username, user.password_hash) if user else ("", _DUMMY_HASH)
    if locked is not None:
        raise AccessDenied(f"signature refused: the account is locked until {_clock(locked)}")
    if _password_matches(stored, password) and user is not None:
        return name

    def work(session: Session) -> None:
        session.add(
            SignInAttempt(ts=utcnow(), username_key=name_key, source_key=_source_key("signature"), kind="failure")
        )
        session.flush()
        audit.record(session, actor, action, object_type, object_id, outcome="failed", details=failure_details)
        until = _locked_until(session, name_key, utcnow(), throttle)
        if until is not None:
            lockout = {"until": until.isoformat(), "failures": throttle.max_failures, "source": "signature"}
            audit.record(
                session, actor, Action.ACCOUNT_LOCKOUT, "user", actor.user_id, outcome="denied", details=lockout
            )

    write(db, work)
    raise AccessDenied("signature refused: the password does not match the signed-in account")


def _password_matches(password_hash: str, password: str) -> bool:
    secret = password[: MAX_PASSWORD_LENGTH + 1].encode("utf-8", "surrogatepass")
    try:
        return _hasher.verify(password_hash, secret)
    except (VerificationError, InvalidHashError):
        return False


def accounts_with_password(db: Database, password: str) -> list[str]:
    """Active accounts whose password is `password` (used to refuse serving the demo accounts remotely)."""
    with db.read_session() as session:
        users = session.scalars(select(User).where(User.is_active.is_(True))).all()
    return [u.username for u in users if _password_matches(u.password_hash, password)]
