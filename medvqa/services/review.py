"""Reviewers' work: the queue of answers to judge, adjudication signed in the 21 CFR 11.50 manner, double
reading, and agreement between readers (Cohen's kappa).

A review is signed when it is made: the reviewer re-enters the password and picks the meaning of the
signature; the row keeps the meaning and the time, and the audit event the printed name as well.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from compliance.policy import Action
from medvqa.db import Answer, Feedback, Instance, Question, Review, Series, Study, Verdict
from medvqa.db.base import utcnow
from medvqa.db.engine import Database
from medvqa.errors import InvalidInput, NotFound
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.transaction import write
from medvqa.services.users import reauthenticate

__all__ = [  # the workbench's review page names these; Verdict is the database's enumeration, re-exported
    "READINGS",
    "SIGNATURE_MEANINGS",
    "Agreement",
    "QueueFilter",
    "ReviewInput",
    "Verdict",
    "adjudicate",
    "agreement",
    "cohen_kappa",
    "held_instances",
    "review_queue",
]

READINGS = 2  # double reading: at most two independent reviewers per answer
SIGNATURE_MEANINGS = {  # 21 CFR 11.50(a)(3): the meaning associated with the signature
    "review": "I reviewed this answer and my verdict stands as recorded",
    "approval": "I approve the reference answer as correct for training",
    "responsibility": "I take responsibility for this adjudication",
    "authorship": "I am the author of the reference answer",
}


@dataclass(frozen=True)
class QueueFilter:
    modality: str = ""
    question_type: str = ""
    adapter_ref: str = ""  # "" any; "none" the bare base model


@dataclass(frozen=True)
class ReviewInput:
    answer_id: int
    verdict: str
    meaning: str
    password: str
    reference_answer: str | None = None
    comment: str | None = None


def review_queue(db: Database, actor: Actor, search: QueueFilter = QueueFilter()) -> list[dict[str, Any]]:
    """Answers this reviewer has not read and that still need a reading: answers the model abstained on first
    (it said it was not confident), then disagreements, then lowest confidence first (none counts as lowest)."""
    authorize(db, actor, Action.REVIEW_CREATE, "answer")
    with db.read_session() as session:
        rows = session.execute(
            select(Answer, Question, Study.modality)
            .join(Question, Question.id == Answer.question_id)
            .join(Study, Study.id == Question.study_id)
        ).all()
        reviews = _reviews_by_answer(session)
        feedback = _latest_feedback_by_answer(session)
    queue = []
    for answer, question, modality in rows:
        readings = reviews.get(answer.id, [])
        if len(readings) >= READINGS or any(r.reviewer_id == actor.user_id for r in readings):
            continue
        if not _matches(search, modality, question.question_type, answer.adapter_ref):
            continue
        verdicts = {r.verdict.value for r in readings} | ({feedback[answer.id]} if answer.id in feedback else set())
        queue.append(
            {
                "answer_id": answer.id,
                "question": question.text,
                "answer": answer.text,
                "confidence": answer.confidence,
                "abstained": bool(answer.abstained),
                "modality": modality,
                "question_type": question.question_type,
                "adapter": answer.adapter_ref or "none",
                "feedback": feedback.get(answer.id, ""),
                "readings": len(readings),
                "disagreement": len(verdicts) > 1 or bool(verdicts - {Verdict.CORRECT.value}),
            }
        )
    queue.sort(
        key=lambda r: (
            not r["abstained"],
            not r["disagreement"],
            -1.0 if r["confidence"] is None else r["confidence"],
        )
    )
    return queue


def _matches(search: QueueFilter, modality: str, question_type: str, adapter_ref: str | None) -> bool:
    if search.modality and modality != search.modality:
        return False
    if search.question_type and question_type != search.question_type:
        return False
    if search.adapter_ref:
        return (adapter_ref or "none") == search.adapter_ref
    return True


def _reviews_by_answer(session: Session) -> dict[int, list[Review]]:
    grouped: dict[int, list[Review]] = {}
    for review in session.scalars(select(Review).order_by(Review.reading)):
        grouped.setdefault(review.answer_id, []).append(review)
    return grouped


def _latest_feedback_by_answer(session: Session) -> dict[int, str]:
    latest = select(Feedback.answer_id, func.max(Feedback.id).label("id")).group_by(Feedback.answer_id).subquery()
    rows = session.execute(select(Feedback.answer_id, Feedback.verdict).join(latest, latest.c.id == Feedback.id))
    return {answer_id: verdict.value for answer_id, verdict in rows}


def adjudicate(db: Database, actor: Actor, item: ReviewInput) -> Review:
    """Record a signed reading of an answer: reading 1, or reading 2 by a different reviewer."""
    authorize(db, actor, Action.REVIEW_CREATE, "answer", item.answer_id)
    _validate(item)
    name = _check_signature(db, actor, item)
    signed_at = utcnow()

    def work(session: Session) -> Review:
        if session.get(Answer, item.answer_id) is None:
            raise NotFound(f"answer {item.answer_id} does not exist")
        earlier = session.scalars(select(Review).where(Review.answer_id == item.answer_id)).all()
        if any(r.reviewer_id == actor.user_id for r in earlier):
            raise InvalidInput(f"you already read answer {item.answer_id}; a second reading needs another reviewer")
        if len(earlier) >= READINGS:
            raise InvalidInput(f"answer {item.answer_id} already has {READINGS} readings")
        review = Review(
            answer_id=item.answer_id,
            reviewer_id=actor.user_id,
            reading=len(earlier) + 1,
            verdict=Verdict(item.verdict),
            reference_answer=item.reference_answer or None,
            comment=item.comment or None,
            signature_meaning=item.meaning,
            signed_at=signed_at,
        )
        session.add(review)
        session.flush()
        details = {"answer_id": item.answer_id, "reading": review.reading, "verdict": item.verdict}
        audit.record(session, actor, Action.REVIEW_CREATE, "review", review.id, details=details)
        signature = {"name": name, "time": signed_at.isoformat(), "meaning": SIGNATURE_MEANINGS[item.meaning]}
        audit.record(session, actor, Action.REVIEW_SIGN, "review", review.id, details=signature)
        return review

    return write(db, work)


def _validate(item: ReviewInput) -> None:
    if item.verdict not in set(Verdict):
        raise InvalidInput(f"verdict {item.verdict!r}: use one of {', '.join(Verdict)}")
    if item.meaning not in SIGNATURE_MEANINGS:
        raise InvalidInput(f"signature meaning {item.meaning!r}: use one of {', '.join(SIGNATURE_MEANINGS)}")
    if item.verdict != Verdict.CORRECT and not (item.reference_answer or "").strip():
        raise InvalidInput("a verdict other than correct needs the reference answer")


def _check_signature(db: Database, actor: Actor, item: ReviewInput) -> str:
    """The signer's printed name, once the password re-entered for this signature matches; else an audited
    refusal. Wrong signature passwords count towards the account's sign-in lockout, so an unattended session
    cannot be used to guess its owner's password."""
    details = {"reason": "password did not match", "answer_id": item.answer_id}
    return reauthenticate(db, actor, item.password, Action.REVIEW_SIGN, "answer", item.answer_id, details)


@dataclass(frozen=True)
class Agreement:
    """Agreement between the two readings of double-read answers."""

    pairs: int
    observed: float | None  # share of answers where both readers gave the same verdict
    kappa: float | None  # Cohen's kappa; None with no pairs, or when chance agreement is 1
    table: dict[str, dict[str, int]]  # first reading -> second reading -> count


def cohen_kappa(pairs: Sequence[tuple[str, str]], labels: Sequence[str] = tuple(Verdict)) -> Agreement:
    """Cohen's kappa = (p_o - p_e) / (1 - p_e) over the verdict pairs of two readers."""
    table = {a: {b: 0 for b in labels} for a in labels}
    for first, second in pairs:
        table[first][second] += 1
    n = len(pairs)
    if n == 0:
        return Agreement(0, None, None, table)
    observed = sum(table[label][label] for label in labels) / n
    firsts, seconds = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    expected = sum(firsts[label] * seconds[label] for label in labels) / (n * n)
    kappa = None if expected == 1 else (observed - expected) / (1 - expected)
    return Agreement(n, observed, kappa, table)


def agreement(db: Database, actor: Actor) -> Agreement:
    """Cohen's kappa between first and second readings over every double-read answer."""
    authorize(db, actor, Action.REVIEW_CREATE, "review")
    with db.read_session() as session:
        grouped = _reviews_by_answer(session)
    pairs = [(r[0].verdict.value, r[1].verdict.value) for r in grouped.values() if len(r) >= READINGS]
    return cohen_kappa(pairs)


def held_instances(db: Database, actor: Actor) -> list[dict[str, Any]]:
    """Instances held for a possible burned-in text that no reviewer has confirmed yet, with the word boxes the
    detector found (boxes and confidences: the recognised text is never kept)."""
    authorize(db, actor, Action.INSTANCE_CONFIRM, "instance")
    with db.read_session() as session:
        rows = session.execute(
            select(Instance, Series.study_id, Series.modality)
            .join(Series, Series.id == Instance.series_id)
            .where(Instance.held_for_burned_in_text.is_(True), Instance.burned_in_confirmed_by.is_(None))
            .order_by(Instance.id)
        ).all()
    return [
        {
            "instance_id": instance.id,
            "series_id": instance.series_id,
            "study_id": study_id,
            "modality": modality,
            "sop_instance_uid": instance.sop_instance_uid,
            "text_boxes": list((instance.burned_in_text or {}).get("boxes", [])),
            "ocr_checked": bool((instance.burned_in_text or {}).get("checked", False)),
        }
        for instance, study_id, modality in rows
    ]
