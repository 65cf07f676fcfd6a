"""Feedback on answers: append-only, idempotent, corrections as new rows that supersede old ones."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from compliance.policy import Action
from medvqa.db import Answer, Feedback, Verdict
from medvqa.db.engine import Database
from medvqa.errors import IdempotencyConflict, InvalidInput, NotFound
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.transaction import write

MAX_KEY_LENGTH = 128


@dataclass(frozen=True)
class FeedbackInput:
    answer_id: int
    verdict: str
    idempotency_key: str
    correction: str | None = None
    comment: str | None = None
    supersedes_id: int | None = None
    reason: str | None = None

    def body_sha256(self, actor: Actor) -> str:
        body = {**vars(self), "author": [actor.user_id, actor.name]}
        del body["idempotency_key"]
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class FeedbackResult:
    feedback: Feedback
    created: bool  # False when the same submission had already been stored under this key


def give_feedback(db: Database, actor: Actor, item: FeedbackInput) -> FeedbackResult:
    """Store one verdict. Repeating a submission with the same key returns the stored row; the same key
    with a different body is refused (and audited as failed)."""
    action = Action.FEEDBACK_SUPERSEDE if item.supersedes_id else Action.FEEDBACK_CREATE
    authorize(db, actor, action, "answer", item.answer_id)
    _validate(item)
    body_sha256 = item.body_sha256(actor)
    try:
        return _store(db, actor, item, body_sha256, action)
    except IntegrityError:
        # A concurrent twin with the same key committed first: look again, it decides.
        return _store(db, actor, item, body_sha256, action)
    except IdempotencyConflict as conflict:
        details = {"reason": str(conflict), "idempotency_key": item.idempotency_key}
        write(
            db,
            lambda session: audit.record(
                session, actor, action, "answer", item.answer_id, outcome="failed", details=details
            ),
        )
        raise


def _validate(item: FeedbackInput) -> None:
    if item.verdict not in set(Verdict):
        raise InvalidInput(f"verdict {item.verdict!r}: use one of {', '.join(Verdict)}")
    if not item.idempotency_key or len(item.idempotency_key) > MAX_KEY_LENGTH:
        raise InvalidInput(f"the idempotency key must have 1 to {MAX_KEY_LENGTH} characters")
    if item.supersedes_id is not None and not (item.reason or "").strip():
        raise InvalidInput("a correction of earlier feedback needs a reason")


def _store(db: Database, actor: Actor, item: FeedbackInput, body_sha256: str, action: str) -> FeedbackResult:
    def work(session: Session) -> FeedbackResult:
        existing = session.scalars(select(Feedback).where(Feedback.idempotency_key == item.idempotency_key)).first()
        if existing is not None:
            if existing.body_sha256 != body_sha256:
                raise IdempotencyConflict(
                    f"idempotency key {item.idempotency_key!r} was already used for a different submission"
                )
            return FeedbackResult(existing, created=False)
        if session.get(Answer, item.answer_id) is None:
            raise NotFound(f"answer {item.answer_id} does not exist")
        version, old = _superseded(session, item)
        row = Feedback(
            answer_id=item.answer_id,
            author_id=actor.user_id,
            verdict=Verdict(item.verdict),
            correction=item.correction,
            comment=item.comment,
            idempotency_key=item.idempotency_key,
            body_sha256=body_sha256,
            supersedes_id=item.supersedes_id,
            reason=item.reason,
            version=version,
        )
        session.add(row)
        session.flush()
        new = {"verdict": item.verdict, "correction": item.correction, "comment": item.comment}
        details = {
            "answer_id": item.answer_id,
            "version": version,
            "old": old,
            "new": new,
            "reason": item.reason,
        }
        audit.record(session, actor, action, "feedback", row.id, details=details)
        return FeedbackResult(row, created=True)

    return write(db, work)


def _superseded(session: Session, item: FeedbackInput) -> tuple[int, dict[str, str | None] | None]:
    """The version of the new row, and the values of the row it replaces (None for a first verdict)."""
    if item.supersedes_id is None:
        return 1, None
    previous = session.get(Feedback, item.supersedes_id)
    if previous is None or previous.answer_id != item.answer_id:
        raise NotFound(f"feedback {item.supersedes_id} on answer {item.answer_id} does not exist")
    already = session.scalar(select(Feedback.id).where(Feedback.supersedes_id == previous.id))
    if already is not None:
        raise InvalidInput(f"feedback {previous.id} was already superseded by feedback {already}")
    return previous.version + 1, {
        "verdict": previous.verdict.value,
        "correction": previous.correction,
        "comment": previous.comment,
    }
