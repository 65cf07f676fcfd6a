"""Reviewed feedback for round tests: small images imported as studies (one patient each), answers recorded with
the exact model input, then reviews and corrections through the real services."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from argon2 import PasswordHasher
from PIL import Image
from pydicom import dcmwrite
from sqlalchemy import select

from medvqa.config import Settings
from medvqa.db import Instance, Series
from medvqa.db.engine import Database
from medvqa.imaging.model_input import to_model_input
from medvqa.imaging.secondary_capture import dataset_from_image
from medvqa.imaging.series import read_series_files
from medvqa.imaging.store import ContentStore
from medvqa.services.answers import AnswerRecord, record_answer
from medvqa.services.audit import Actor
from medvqa.services.feedback import FeedbackInput, give_feedback
from medvqa.services.review import ReviewInput, adjudicate
from medvqa.services.studies import import_paths
from tests.factories import OPERATOR, PASSWORD

MODEL_SIZE = 32  # pixels of the model input recorded with each answer


@pytest.fixture
def cheap_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accounts hashed with the cheapest argon2id settings: signing reviews costs milliseconds, not seconds.
    (Verification reads the settings from the stored hash, so both sides stay consistent.)"""
    from medvqa.services import users

    monkeypatch.setattr(users, "_hasher", PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))


@dataclass(frozen=True)
class ImportedImage:
    png: Path  # the picture as a file, e.g. for a locked test set
    study_id: int
    series_id: int


def write_png(path: Path, seed: int, body: int = 40) -> Path:
    """A small grey picture whose pixels depend on `seed` (distinct images, distinct pixel hashes)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(body, body), dtype=np.uint8), mode="L").save(path)
    return path


def import_image(db: Database, settings: Settings, png: Path, body_part: str = "CHEST") -> ImportedImage:
    """Import the picture as a secondary capture (no burned-in text), its own study and patient."""
    dicom = png.with_suffix(".dcm")
    dataset = dataset_from_image(png.read_bytes(), 10**8, modality="CT", body_part=body_part, burned_in_annotation="NO")
    dcmwrite(dicom, dataset, enforce_file_format=True)
    report = import_paths(db, OPERATOR, [dicom], settings)
    study_id = report.study_ids[0]
    with db.read_session() as session:
        series_id = session.scalars(select(Series.id).where(Series.study_id == study_id)).one()
    return ImportedImage(png, study_id, series_id)


def record_model_answer(
    db: Database, settings: Settings, actor: Actor, image: ImportedImage, question: str, text: str, qtype: str = "PRES"
) -> int:
    """Store an answer exactly as `ask` would: the recorded selection and preprocess hash of the real model input."""
    with db.read_session() as session:
        paths = session.scalars(select(Instance.storage_path).where(Instance.series_id == image.series_id)).all()
    store = ContentStore(settings.store_dir)
    prepared = to_model_input(read_series_files([store.path(p) for p in paths]), None, None, MODEL_SIZE)
    record = AnswerRecord(
        text=text,
        model_ref="tiny@000000000000",
        prompt_version="vqa-v1",
        preprocess_hash=prepared.preprocess_hash,
        backend="transformers",
        latency_ms=1.0,
    )
    row = record_answer(
        db,
        actor,
        image.study_id,
        question,
        record,
        series_id=image.series_id,
        image_selection=prepared.selection,
        question_type=qtype,
    )
    return row.id


def review(db: Database, reviewer: Actor, answer_id: int, verdict: str, reference: str | None = None) -> None:
    adjudicate(db, reviewer, ReviewInput(answer_id, verdict, "review", PASSWORD, reference_answer=reference))


def correct(db: Database, clinician: Actor, answer_id: int, correction: str, verdict: str = "incorrect") -> None:
    key = f"fix-{answer_id}-{correction}"
    give_feedback(db, clinician, FeedbackInput(answer_id, verdict, key, correction=correction))


def write_locked_test_set(path: Path, pngs: list[Path], patients: list[str] | None = None) -> Path:
    """A VQA jsonl over the given pictures: one closed and one open question each (with `patient` when given)."""
    rows = []
    for index, png in enumerate(pngs):
        for kind, question, answer in (("CLOSED", "Is there a lesion?", "yes"), ("OPEN", "Which organ?", "lung")):
            row = {"qid": f"t{index}{kind[0]}", "image": str(png), "question": question, "answer": answer}
            row |= {"answer_type": kind, "question_type": "PRES" if kind == "CLOSED" else "ORGAN", "organ": "CHEST"}
            if patients:
                row["patient"] = patients[index]
            rows.append(row)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
