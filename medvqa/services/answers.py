"""Storing a question and the model's answer with its full provenance, in one audited transaction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from compliance.policy import Action
from medvqa.db import Answer, Question, Study
from medvqa.db.engine import Database
from medvqa.errors import NotFound
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.transaction import write


@dataclass(frozen=True)
class AnswerRecord:
    """What the model produced and exactly what produced it (see DESIGN.md, "Model contract")."""

    text: str
    model_ref: str
    prompt_version: str
    preprocess_hash: str
    backend: str
    latency_ms: float
    confidence: float | None = None
    token_scores: list[Any] = field(default_factory=list)
    adapter_id: int | None = None
    adapter_ref: str | None = None
    decoding: dict[str, Any] = field(default_factory=dict)
    raw_confidence: float | None = None  # before calibration; `confidence` is the calibrated one
    calibration: dict[str, Any] | None = None  # the calibration applied (file, sha256, methods, kind, threshold)
    abstained: bool | None = None  # None: no calibration judged the answer


def record_answer(
    db: Database,
    actor: Actor,
    study_id: int,
    question_text: str,
    answer: AnswerRecord,
    *,
    series_id: int | None = None,
    image_selection: dict[str, Any] | None = None,
    question_type: str = "",
) -> Answer:
    authorize(db, actor, Action.QUESTION_ASK, "study", study_id)

    def work(session: Session) -> Answer:
        if session.get(Study, study_id) is None:
            raise NotFound(f"study {study_id} does not exist")
        question = Question(
            study_id=study_id,
            series_id=series_id,
            image_selection=image_selection or {},
            text=question_text,
            question_type=question_type,
            asked_by=actor.user_id,
        )
        session.add(question)
        session.flush()
        row = Answer(question_id=question.id, **vars(answer))
        session.add(row)
        session.flush()
        provenance = {
            "question_id": question.id,
            "model_ref": answer.model_ref,
            "adapter_ref": answer.adapter_ref,
            "prompt_version": answer.prompt_version,
            "preprocess_hash": answer.preprocess_hash,
            "calibration_sha256": (answer.calibration or {}).get("sha256"),
            "abstained": answer.abstained,
        }
        audit.record(session, actor, Action.QUESTION_ASK, "answer", row.id, details=provenance)
        return row

    return write(db, work)
