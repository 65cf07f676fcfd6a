"""Freeze reviewed feedback into a dataset snapshot: rows, de-identified images and JSON Lines in a folder named
by the snapshot's content hash, split into train and validation by patient.

What goes in, per answer (the newest decision wins; `since` keeps decisions made after that time only):
- an adjudicated answer (a review): the reviewer's reference answer when given, else the model's answer the
  reviewer judged correct; when two readings lead to different answers the item is left out (readers disagree);
- else a correction: the newest feedback on the answer, when it is not "correct" and carries a corrected answer.
The reviewer's reference answer always wins over the model's answer and over a clinician's correction.
Images are rebuilt from the stored, de-identified instances exactly as the model saw them (the preprocess hash
must match the one stored with the answer) and written as plain PNG pixels: no DICOM header leaves the store.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from medvqa.db import Answer, Feedback, Instance, Question, Review, Study, Verdict
from medvqa.errors import InvalidInput
from medvqa.imaging.model_input import ModelInput, to_model_input
from medvqa.imaging.series import PRESETS, Window, read_series_files
from medvqa.imaging.series import Series as SeriesVolume
from medvqa.imaging.store import ContentStore
from medvqa.training.data import UNKNOWN, infer_answer_type
from medvqa.training.locked_test import LockedTestSet
from medvqa.training.metrics import normalize_answer

MANIFEST = "manifest.json"
TRAIN_FILE, VALIDATION_FILE = "train.jsonl", "validation.jsonl"
FORMAT = "medvqa.snapshot/1"


class SnapshotRefused(InvalidInput):
    """A snapshot cannot be used for a round: too small, no validation patients, or it leaks the locked test set."""


@dataclass(frozen=True)
class Candidate:
    """One reviewed answer and the answer to train on, before its image is rebuilt."""

    answer_id: int
    patient: str
    question: str
    target: str
    source: str  # "review" or "correction"
    question_type: str
    organ: str
    series_id: int
    selection: dict[str, Any]
    preprocess_hash: str


@dataclass(frozen=True)
class SnapshotItem:
    answer_id: int
    patient: str
    question: str
    answer: str
    answer_type: str
    source: str
    question_type: str
    organ: str
    image_sha256: str  # the preprocess hash: pixels and the settings that made them
    pixel_hashes: tuple[str, ...]  # of the source instances, for the leak check
    split: str  # "train" or "validation"

    def jsonl_row(self) -> dict[str, Any]:
        return {
            "qid": str(self.answer_id),
            "image": f"images/{self.image_sha256}.png",
            "question": self.question,
            "answer": self.answer,
            "answer_type": self.answer_type,
            "question_type": self.question_type,
            "organ": self.organ,
            "patient": self.patient,
            "source": self.source,
        }


@dataclass(frozen=True)
class Snapshot:
    items: tuple[SnapshotItem, ...]
    content_sha256: str
    folder: Path
    left_out: dict[str, int]  # reason -> how many reviewed answers were not used

    @property
    def answer_ids(self) -> list[int]:
        return [item.answer_id for item in self.items]

    @property
    def train_file(self) -> Path:
        return self.folder / TRAIN_FILE

    @property
    def validation_file(self) -> Path:
        return self.folder / VALIDATION_FILE

    def split_counts(self) -> dict[str, int]:
        return dict(Counter(item.split for item in self.items))


def collect_candidates(session: Session, since: datetime | None = None) -> tuple[list[Candidate], Counter[str]]:
    """Every answer with a usable reviewed answer, oldest answer first, and why the others were left out."""
    reviews: dict[int, list[Review]] = {}
    for review in session.scalars(select(Review).order_by(Review.id)):
        reviews.setdefault(review.answer_id, []).append(review)
    latest_feedback: dict[int, Feedback] = {
        row.answer_id: row for row in session.scalars(select(Feedback).order_by(Feedback.id))
    }
    rows = session.execute(
        select(Answer, Question, Study)
        .join(Question, Question.id == Answer.question_id)
        .join(Study, Study.id == Question.study_id)
        .where(Answer.id.in_(set(reviews) | set(latest_feedback)))
        .order_by(Answer.id)
    ).all()
    found, left_out = [], Counter[str]()
    for answer, question, study in rows:
        decided = _target(answer, reviews.get(answer.id, []), latest_feedback.get(answer.id))
        if isinstance(decided, str):
            left_out[decided] += 1
            continue
        target, source, when = decided
        if since is not None and _aware(when) <= _aware(since):
            continue
        if question.series_id is None or "slices" not in question.image_selection:
            left_out["no recorded image"] += 1
            continue
        found.append(
            Candidate(
                answer.id,
                study.patient_pseudonym,
                question.text,
                target,
                source,
                question.question_type or UNKNOWN,
                study.body_part or UNKNOWN,
                question.series_id,
                question.image_selection,
                answer.preprocess_hash,
            )
        )
    return found, left_out


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive UTC timestamps; PostgreSQL aware ones."""
    from datetime import UTC

    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _target(answer: Answer, readings: Sequence[Review], feedback: Feedback | None) -> tuple[str, str, datetime] | str:
    """(answer to train on, source, when decided), or the reason the answer is not used."""
    if readings:
        targets = [
            r.reference_answer or answer.text if r.verdict == Verdict.CORRECT else r.reference_answer for r in readings
        ]
        texts = [t for t in targets if t and t.strip()]
        if len(texts) != len(targets) or len({normalize_answer(t) for t in texts}) != 1:
            return "readers disagree"
        return texts[-1].strip(), "review", readings[-1].created_at
    if feedback is not None and feedback.verdict != Verdict.CORRECT and (feedback.correction or "").strip():
        return str(feedback.correction).strip(), "correction", feedback.created_at
    return "feedback without a correction or review"


def split_by_patient(patients: Iterable[str], fraction: float) -> frozenset[str]:
    """The validation patients: the first ceil(fraction x n) by SHA-256 of the pseudonym (order-independent,
    the same on every machine); at least one, and never all."""
    unique = sorted(set(patients), key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    if len(unique) < 2:
        raise SnapshotRefused(
            f"the snapshot has {len(unique)} patient(s); a train / validation split by patient needs at least two"
        )
    count = min(len(unique) - 1, max(1, math.ceil(fraction * len(unique))))
    return frozenset(unique[:count])


def replay_selection(volume: SeriesVolume, selection: dict[str, Any]) -> ModelInput:
    """The model input an answer recorded, rebuilt from its series and its recorded selection."""
    kind, slices = selection.get("kind"), selection["slices"]
    chosen: int | list[int] | None = None if kind == "key_slice" else slices[0] if kind == "slice" else slices
    recorded = selection.get("window", {})
    name = str(recorded.get("name", ""))
    window: str | Window | None
    if name in PRESETS or name == "auto":
        window = name
    elif "voi_lut_sha256" in recorded or "center" not in recorded:
        window = None
    else:
        window = Window(float(recorded["center"]), float(recorded["width"]), name or "custom")
    return to_model_input(volume, chosen, window, int(selection["size"]))


def freeze_snapshot(
    session: Session,
    store: ContentStore,
    root: Path,
    *,
    validation_fraction: float,
    min_examples: int,
    since: datetime | None = None,
) -> Snapshot:
    """Collect reviewed answers, rebuild their images, split by patient, and write the snapshot under
    `root/<content sha256>/` (left as is when that folder already holds the same snapshot)."""
    candidates, left_out = collect_candidates(session, since)
    rebuilt = _rebuild_images(session, store, candidates, left_out)
    if len(rebuilt) < min_examples:
        raise SnapshotRefused(
            f"the snapshot holds {len(rebuilt)} reviewed example(s); a round needs at least {min_examples} "
            "(MEDVQA_ROUND_MIN_EXAMPLES): review more answers first"
        )
    validation = split_by_patient((c.patient for c, _, _ in rebuilt), validation_fraction)
    items = tuple(
        SnapshotItem(
            answer_id=c.answer_id,
            patient=c.patient,
            question=c.question,
            answer=c.target,
            answer_type=infer_answer_type(c.target),
            source=c.source,
            question_type=c.question_type,
            organ=c.organ,
            image_sha256=image.preprocess_hash,
            pixel_hashes=hashes,
            split="validation" if c.patient in validation else "train",
        )
        for c, image, hashes in rebuilt
    )
    digest = content_sha256(items)
    folder = root / digest
    if not (folder / MANIFEST).is_file():
        _write_folder(folder, items, digest, {c.answer_id: image for c, image, _ in rebuilt})
    return Snapshot(items, digest, folder, dict(left_out))


def content_sha256(items: Sequence[SnapshotItem]) -> str:
    """SHA-256 over the canonical JSON of the items (ids, texts, labels, split, image hashes)."""
    canonical = json.dumps([asdict(item) for item in items], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _rebuild_images(
    session: Session, store: ContentStore, candidates: Sequence[Candidate], left_out: Counter[str]
) -> list[tuple[Candidate, ModelInput, tuple[str, ...]]]:
    """Each candidate's image as the model saw it; candidates whose image changed or is held are left out."""
    volumes: dict[int, tuple[SeriesVolume, dict[str, Instance]]] = {}
    rebuilt = []
    for candidate in candidates:
        if candidate.series_id not in volumes:
            instances = session.scalars(select(Instance).where(Instance.series_id == candidate.series_id)).all()
            volume = read_series_files([store.path(i.storage_path) for i in instances])
            volumes[candidate.series_id] = volume, {i.sop_instance_uid: i for i in instances}
        volume, by_uid = volumes[candidate.series_id]
        try:
            image = replay_selection(volume, candidate.selection)
        except InvalidInput:
            left_out["image cannot be rebuilt"] += 1
            continue
        shown = [by_uid[uid] for uid in image.selection["instance_uids"] if uid in by_uid]
        if any(i.held_for_burned_in_text and i.burned_in_confirmed_by is None for i in shown):
            left_out["held for a burned-in text check"] += 1
        elif image.preprocess_hash != candidate.preprocess_hash:
            left_out["image differs from the one answered"] += 1
        else:
            rebuilt.append((candidate, image, tuple(sorted(i.pixel_hash for i in shown))))
    return rebuilt


def _write_folder(folder: Path, items: Sequence[SnapshotItem], digest: str, images: dict[int, ModelInput]) -> None:
    """Write into a scratch folder beside the target, then rename: a snapshot folder is complete or absent."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".snapshot-", dir=folder.parent))
    try:
        (scratch / "images").mkdir()
        for item in items:
            target = scratch / "images" / f"{item.image_sha256}.png"
            if not target.exists():
                images[item.answer_id].image.save(target, format="PNG")  # pixels only: no metadata
        for name, split in ((TRAIN_FILE, "train"), (VALIDATION_FILE, "validation")):
            rows = [item.jsonl_row() for item in items if item.split == split]
            (scratch / name).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
        manifest = {"format": FORMAT, "content_sha256": digest, "items": [asdict(item) for item in items]}
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(scratch, folder)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def check_no_leak(snapshot: Snapshot, locked: LockedTestSet) -> None:
    """Refuse a snapshot that holds a patient (or, for sets without patients, an image) of the locked test set."""
    leaking = [
        item.answer_id
        for item in snapshot.items
        if item.patient in locked.patients or locked.pixel_hashes.intersection(item.pixel_hashes)
    ]
    if leaking:
        shown = ", ".join(map(str, leaking[:10])) + (" ..." if len(leaking) > 10 else "")
        raise SnapshotRefused(
            f"{len(leaking)} snapshot item(s) show a patient or image of the locked test set ({locked.path.name}): "
            f"answers {shown}; a round may never train on the test set"
        )
