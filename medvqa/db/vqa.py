"""Questions, answers with full provenance, append-only feedback, and reviews."""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import JSON, Boolean, Enum, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from medvqa.db.base import Base, IntPK, JsonDict, LongText, OptionalTimestamp, Sha256, Timestamp


class Verdict(enum.StrEnum):
    CORRECT = "correct"
    PARTIAL = "partial"
    INCORRECT = "incorrect"


def _enum_column(enum_cls: type[enum.StrEnum], name: str) -> Enum:
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
    )


class Question(Base):
    __tablename__ = "questions"

    id: Mapped[IntPK]
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int | None] = mapped_column(ForeignKey("series.id"))
    image_selection: Mapped[JsonDict]  # {"kind": "slice"|"key_slice"|"montage", "slices": [...]}
    text: Mapped[LongText]
    question_type: Mapped[str] = mapped_column(String(32), default="")
    asked_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    asked_at: Mapped[Timestamp]


class Answer(Base):
    """What the model said, and exactly what produced it."""

    __tablename__ = "answers"

    id: Mapped[IntPK]
    question_id: Mapped[int] = mapped_column(ForeignKey("questions.id"), index=True)
    text: Mapped[LongText]
    confidence: Mapped[float | None] = mapped_column(Float)
    token_scores: Mapped[list[Any]] = mapped_column(JSON, default=list)
    model_ref: Mapped[str] = mapped_column(String(160))
    adapter_id: Mapped[int | None] = mapped_column(ForeignKey("adapters.id"), index=True)
    adapter_ref: Mapped[str | None] = mapped_column(String(160))
    prompt_version: Mapped[str] = mapped_column(String(64))
    preprocess_hash: Mapped[Sha256]
    decoding: Mapped[JsonDict]
    backend: Mapped[str] = mapped_column(String(32))
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[Timestamp]
    # Calibration (migration 0005; NULL on earlier answers): `confidence` is then the calibrated one.
    raw_confidence: Mapped[float | None] = mapped_column(Float)
    calibration: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # file, sha256, methods, kind, threshold
    abstained: Mapped[bool | None] = mapped_column(Boolean, index=True)  # None: no calibration judged it


class Feedback(Base):
    """A verdict on an answer. Append-only (database triggers refuse UPDATE/DELETE);
    a correction is a new row that supersedes the earlier one, with a reason."""

    __tablename__ = "feedback"

    id: Mapped[IntPK]
    answer_id: Mapped[int] = mapped_column(ForeignKey("answers.id"), index=True)
    author_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    verdict: Mapped[Verdict] = mapped_column(_enum_column(Verdict, "verdict"))
    correction: Mapped[str | None] = mapped_column(Text)
    comment: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str] = mapped_column(String(128), unique=True)
    body_sha256: Mapped[Sha256]
    supersedes_id: Mapped[int | None] = mapped_column(ForeignKey("feedback.id"), unique=True)
    reason: Mapped[str | None] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[Timestamp]


class Review(Base):
    """A reviewer's adjudication of an answer; reading 1 or 2 for double reading."""

    __tablename__ = "reviews"

    id: Mapped[IntPK]
    answer_id: Mapped[int] = mapped_column(ForeignKey("answers.id"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    reading: Mapped[int] = mapped_column(Integer, default=1)
    verdict: Mapped[Verdict] = mapped_column(_enum_column(Verdict, "review_verdict"))
    reference_answer: Mapped[str | None] = mapped_column(Text)
    comment: Mapped[str | None] = mapped_column(Text)
    signature_meaning: Mapped[str | None] = mapped_column(String(64))
    signed_at: Mapped[OptionalTimestamp]
    created_at: Mapped[Timestamp]


class AnswerHeatmap(Base):
    """Where the model looked for one answer: the saliency map on the image-token grid, its hash (the
    answer's heatmap provenance), the method, and the sanity checks of the model that made it. Made on
    request, once per answer; the map is shown only when the checks pass (medvqa/model/saliency.py)."""

    __tablename__ = "answer_heatmaps"

    id: Mapped[IntPK]
    answer_id: Mapped[int] = mapped_column(ForeignKey("answers.id"), unique=True)
    method: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[Sha256]
    grid: Mapped[list[Any]] = mapped_column(JSON)  # rows of floats in [0, 1]
    checks: Mapped[dict[str, Any]] = mapped_column(JSON)  # SanityCheck.to_json()
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[Timestamp]
