"""Read-only look-ups the workbench and the command line list from: studies, series, answers.

Nothing here writes; reads that the policy restricts are authorised (a refusal is audited by `authorize`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import and_, case, func, select

from compliance.policy import Action
from medvqa.db import Answer, Feedback, Instance, Question, Series, Study, User
from medvqa.db.engine import Database
from medvqa.errors import NotFound
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.studies import list_studies


@dataclass(frozen=True)
class StudyFilter:
    """Study list search; empty fields match everything."""

    modality: str = ""
    body_part: str = ""
    text: str = ""  # part of the study UID or the patient pseudonym
    study_date_from: date | None = None
    study_date_to: date | None = None
    imported_from: date | None = None
    imported_to: date | None = None

    def matches(self, row: dict[str, Any]) -> bool:
        if self.modality and row["modality"] != self.modality:
            return False
        if self.body_part and row["body_part"] != self.body_part:
            return False
        needle = self.text.strip().lower()
        if needle and needle not in row["study_uid"].lower() and needle not in row["patient"].lower():
            return False
        studied = date.fromisoformat(row["study_date"]) if row["study_date"] else None
        if not _within(studied, self.study_date_from, self.study_date_to):
            return False
        imported = datetime.fromisoformat(row["imported_at"]).date()
        return _within(imported, self.imported_from, self.imported_to)


def _within(value: date | None, low: date | None, high: date | None) -> bool:
    if low is None and high is None:
        return True
    return value is not None and (low is None or value >= low) and (high is None or value <= high)


def search_studies(db: Database, actor: Actor, search: StudyFilter = StudyFilter()) -> list[dict[str, Any]]:
    """De-identified studies matching `search`, newest import first."""
    return [row for row in list_studies(db, actor) if search.matches(row)]


def study_id_for(db: Database, reference: str) -> int:
    """A study given by UID (or by its database id, for convenience)."""
    with db.read_session() as session:
        found = session.scalar(select(Study.id).where(Study.study_uid == reference))
        if found is None and reference.isdigit():
            found = session.scalar(select(Study.id).where(Study.id == int(reference)))
    if found is None:
        raise NotFound(f"study {reference!r} does not exist; `medvqa studies list` shows the studies")
    return found


def series_id_for(db: Database, study_id: int, reference: str) -> int:
    """A series of the study given by UID (or database id)."""
    with db.read_session() as session:
        query = select(Series.id).where(Series.study_id == study_id)
        found = session.scalar(query.where(Series.series_uid == reference))
        if found is None and reference.isdigit():
            found = session.scalar(query.where(Series.id == int(reference)))
    if found is None:
        raise NotFound(f"series {reference!r} is not part of study {study_id}")
    return found


def study_series(db: Database, actor: Actor, study_id: int) -> list[dict[str, Any]]:
    """The series of a study with instance counts and how many are held for a burned-in text check."""
    authorize(db, actor, Action.STUDY_VIEW, "study", study_id)
    waiting = and_(Instance.held_for_burned_in_text.is_(True), Instance.burned_in_confirmed_by.is_(None))
    held = func.sum(case((waiting, 1), else_=0))
    with db.read_session() as session:
        rows = session.execute(
            select(Series, func.count(Instance.id), held)
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id == study_id)
            .group_by(Series.id)
            .order_by(Series.series_number, Series.id)
        ).all()
    return [
        {
            "id": s.id,
            "series_uid": s.series_uid,
            "modality": s.modality,
            "number": s.series_number,
            "description": s.description,
            "instances": count,
            "held": int(held_count or 0),
        }
        for s, count, held_count in rows
    ]


def answer_detail(db: Database, actor: Actor, answer_id: int) -> dict[str, Any]:
    """An answer with its question, provenance and feedback, for review and the command line."""
    authorize(db, actor, Action.STUDY_VIEW, "answer", answer_id)
    with db.read_session() as session:
        found = session.execute(
            select(Answer, Question).join(Question, Question.id == Answer.question_id).where(Answer.id == answer_id)
        ).first()
        if found is None:
            raise NotFound(f"answer {answer_id} does not exist")
        answer, question = found
        feedback = session.scalars(select(Feedback).where(Feedback.answer_id == answer_id).order_by(Feedback.id)).all()
        return {
            "id": answer.id,
            "study_id": question.study_id,
            "series_id": question.series_id,
            "question": question.text,
            "question_type": question.question_type,
            "image_selection": question.image_selection,
            "answer": answer.text,
            "confidence": answer.confidence,
            "raw_confidence": answer.raw_confidence,
            "abstained": answer.abstained,
            "calibration": answer.calibration,
            "model_ref": answer.model_ref,
            "adapter_ref": answer.adapter_ref,
            "prompt_version": answer.prompt_version,
            "preprocess_hash": answer.preprocess_hash,
            "latency_ms": answer.latency_ms,
            "feedback": [
                {"id": f.id, "verdict": f.verdict.value, "correction": f.correction, "comment": f.comment}
                for f in feedback
            ],
        }


THREAD_LENGTH = 20


def study_thread(db: Database, actor: Actor, study_id: int, limit: int = THREAD_LENGTH) -> list[dict[str, Any]]:
    """The conversation about a study: its last `limit` questions and answers, oldest first, as anyone allowed
    to view the study sees them (who asked, when, about which image, the answer with its confidence and whether
    the model abstained, and the latest rating)."""
    authorize(db, actor, Action.STUDY_VIEW, "study", study_id)
    with db.read_session() as session:
        if session.get(Study, study_id) is None:
            raise NotFound(f"study {study_id} does not exist")
        rows = session.execute(
            select(Answer, Question, User.username)
            .join(Question, Question.id == Answer.question_id)
            .outerjoin(User, User.id == Question.asked_by)
            .where(Question.study_id == study_id)
            .order_by(Answer.id.desc())
            .limit(limit)
        ).all()
        ids = [answer.id for answer, _, _ in rows]
        ratings = {
            row.answer_id: row.verdict.value
            for row in session.scalars(select(Feedback).where(Feedback.answer_id.in_(ids)).order_by(Feedback.id))
        }
    return [
        {
            "answer_id": answer.id,
            "question": question.text,
            "question_type": question.question_type,
            "asked_by": username or "-",
            "asked_at": question.asked_at,
            "image_selection": question.image_selection,
            "answer": answer.text,
            "confidence": answer.confidence,
            "calibrated": answer.calibration is not None,
            "abstained": bool(answer.abstained),
            "model_ref": answer.model_ref,
            "adapter_ref": answer.adapter_ref,
            "rating": ratings.get(answer.id),
        }
        for answer, question, username in reversed(rows)
    ]
