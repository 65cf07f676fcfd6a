"""User accounts: create (admin only) and sign in. Passwords are stored as argon2id hashes only."""

from __future__ import annotations

import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from compliance.policy import Action, Role
from medvqa.db import Role as RoleRow
from medvqa.db import User
from medvqa.db.engine import Database
from medvqa.errors import AccessDenied, InvalidInput
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.transaction import write

USERNAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")
MIN_PASSWORD_LENGTH = 12
_hasher = PasswordHasher()
# Verified against when the username is unknown, so that a wrong name and a wrong password take as long.
_DUMMY_HASH = _hasher.hash("medvqa-timing-equaliser")


def check_password_policy(username: str, password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    if username.lower() in password.lower():
        raise InvalidInput("the password must not contain the username")


def add_user(db: Database, actor: Actor, username: str, password: str, role: str, display_name: str = "") -> User:
    """Create an account; the audit event names the user and role, never the password."""
    authorize(db, actor, Action.USER_CREATE, "user", username)
    if not USERNAME_PATTERN.match(username):
        raise InvalidInput(
            f"username {username!r}: use 2-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if role not in set(Role):
        raise InvalidInput(f"role {role!r} does not exist; choose one of: {', '.join(Role)}")
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


def authenticate(db: Database, username: str, password: str) -> Actor:
    """Sign in: the Actor of an active account whose password matches; every attempt is audited."""
    with db.read_session() as session:
        user = session.scalars(select(User).where(User.username == username)).one_or_none()
    ok = _password_matches(user.password_hash if user else _DUMMY_HASH, password)
    ok = ok and user is not None and user.is_active
    actor = Actor(username, user.role.name if user else "unknown", user.id if user else None)
    write(
        db,
        lambda session: audit.record(
            session, actor, Action.SESSION_LOGIN, "user", actor.user_id, outcome="success" if ok else "failed"
        ),
    )
    if not ok:
        raise AccessDenied("sign-in failed: unknown user, wrong password, or disabled account")
    return actor


def _password_matches(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False
