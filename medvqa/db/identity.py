"""Who may act: roles, user accounts, and sign-in sessions."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from medvqa.db.base import Base, IntPK, Name, OptionalTimestamp, Sha256, Timestamp


class Role(Base):
    """One of the fixed roles of compliance.policy.Role; rows are seeded by the first migration."""

    __tablename__ = "roles"

    id: Mapped[IntPK]
    name: Mapped[str] = mapped_column(String(32), unique=True)
    description: Mapped[str] = mapped_column(String(256))


class User(Base):
    """A local account; the password is stored as an argon2id hash only."""

    __tablename__ = "users"

    id: Mapped[IntPK]
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[Name]
    role_id: Mapped[int] = mapped_column(ForeignKey("roles.id"), index=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[Timestamp]

    role: Mapped[Role] = relationship(lazy="joined")


class UserSession(Base):
    """A signed-in session of the workbench; only the hash of its token is kept."""

    __tablename__ = "sessions"

    id: Mapped[IntPK]
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[Sha256] = mapped_column(unique=True)
    created_at: Mapped[Timestamp]
    last_seen_at: Mapped[Timestamp]
    ended_at: Mapped[OptionalTimestamp]
    ended_reason: Mapped[str | None] = mapped_column(String(32))


class SignInAttempt(Base):
    """One sign-in attempt, kept for throttling: keyed hashes of the name tried and of the source address,
    never the name or address themselves. `kind` is failure, success, or unlock (an administrator's)."""

    __tablename__ = "sign_in_attempts"
    __table_args__ = (
        Index("ix_sign_in_attempts_username_ts", "username_key", "ts"),
        Index("ix_sign_in_attempts_source_ts", "source_key", "ts"),
    )

    id: Mapped[IntPK]
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    username_key: Mapped[Sha256]
    source_key: Mapped[Sha256]
    kind: Mapped[str] = mapped_column(String(16))
