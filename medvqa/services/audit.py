"""Recording audit events inside a write transaction, and verifying the whole trail."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from compliance.audit_chain import (
    GENESIS_HASH,
    AnchorError,
    ChainEvent,
    VerifyReport,
    compute_hash,
    verify_chain,
)
from medvqa.db import AuditEvent
from medvqa.db.base import utcnow
from medvqa.db.engine import Database
from medvqa.services.transaction import PENDING_HEADS

ACTION_PATTERN = re.compile(r"^[a-z_]+:[a-z_]+:[a-z_]+$")
OUTCOMES = ("success", "denied", "failed")


@dataclass(frozen=True)
class Actor:
    """Who acts: a signed-in user, or the local operator at the command line (user_id None)."""

    name: str
    role: str
    user_id: int | None = None


def record(
    session: Session,
    actor: Actor,
    action: str,
    object_type: str,
    object_id: object | None = None,
    *,
    outcome: str = "success",
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the chain in the caller's transaction (which holds the chain lock)."""
    if not ACTION_PATTERN.match(action):
        raise ValueError(f"audit action {action!r} is not source:subject:action")
    if outcome not in OUTCOMES:
        raise ValueError(f"audit outcome {outcome!r} is not one of {OUTCOMES}")
    head = session.execute(select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)).first()
    seq, prev_hash = (head.seq + 1, head.hash) if head else (1, GENESIS_HASH)
    chained = ChainEvent(
        seq=seq,
        ts=utcnow(),
        actor_user_id=actor.user_id,
        actor_name=actor.name,
        actor_role=actor.role,
        action=action,
        object_type=object_type,
        object_id=None if object_id is None else str(object_id),
        outcome=outcome,
        details=details or {},
        prev_hash=prev_hash,
    )
    row = AuditEvent(**{**_fields(chained), "hash": compute_hash(chained)})
    session.add(row)
    session.flush()
    session.info.setdefault(PENDING_HEADS, []).append((row.seq, row.hash))
    return row


def _fields(event: ChainEvent) -> dict[str, Any]:
    return {name: getattr(event, name) for name in ChainEvent.__dataclass_fields__ if name != "hash"}


def iter_events(session: Session, batch: int = 5_000) -> Iterator[ChainEvent]:
    """Every event in seq order, streamed as plain rows (no ORM objects: verification reads 100,000s)."""
    columns = [AuditEvent.__table__.c[name] for name in ChainEvent.__dataclass_fields__]
    rows = session.execute(select(*columns).order_by(AuditEvent.seq).execution_options(yield_per=batch))
    for row in rows:
        yield ChainEvent(*row)


def verify(db: Database, strict: bool = False) -> VerifyReport:
    """Check the chain in the database against itself and against the anchor outside it."""
    try:
        anchor = db.anchor.read()
    except AnchorError as exc:
        with db.read_session() as session:
            has_events = session.execute(select(AuditEvent.seq).limit(1)).first() is not None
        if not has_events and not db.anchor.path.exists():
            anchor = {}
        else:
            return VerifyReport(False, first_bad_seq=1, reason=str(exc))
    with db.read_session() as session, session.begin():
        return verify_chain(iter_events(session), anchor, strict)
