"""Asking a question about a stored study: the exact model input, the model's answer, stored with provenance.

The workbench and `medvqa ask` both come here. The model is loaded once by the caller (`load_answering_model`)
and passed in, so the app can keep it behind `st.cache_resource`. torch and transformers are imported lazily.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from compliance.policy import Action
from medvqa.config import Settings
from medvqa.db import Adapter, AdapterStatus, Answer, Question, Series, Study
from medvqa.db.engine import Database
from medvqa.errors import InvalidInput, NotFound
from medvqa.imaging.series import Window
from medvqa.services.access import authorize
from medvqa.services.answers import AnswerRecord, record_answer
from medvqa.services.audit import Actor
from medvqa.services.confidence import Judged, judge
from medvqa.services.images import model_input
from medvqa.services.question_types import infer_question_type

if TYPE_CHECKING:
    from PIL.Image import Image

    from medvqa.model.loading import LoadedModel
    from medvqa.model.vllm_backend import VLLMClient
    from medvqa.training.calibration import LoadedCalibration

BACKEND = "transformers"
# Question templates by VQA-RAD question type; "{finding}" is filled in by the clinician.
QUESTION_TEMPLATES: dict[str, tuple[str, str]] = {
    "PRES": ("presence", "Is there {finding} in this image?"),
    "POS": ("location", "Where is the {finding} located?"),
    "MODALITY": ("modality", "What imaging modality was used?"),
    "PLANE": ("plane", "In which plane is this image taken?"),
    "SIZE": ("size", "How large is the {finding}?"),
    "ABN": ("abnormality", "Is there something abnormal in this image?"),
}


@dataclass(frozen=True)
class ServingModel:
    """The loaded model the workbench answers with, and the adapter row it carries (None: the bare base).

    One model serves every workbench session; `lock` lets one generation run at a time, so concurrent
    questions queue instead of splitting the CPU (or GPU memory) between them. With MEDVQA_MODEL_BACKEND=vllm
    `loaded` is a client of the vLLM server instead, and no lock is taken: the server batches requests.
    """

    loaded: LoadedModel | VLLMClient
    adapter_id: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)
    calibration: LoadedCalibration | None = None  # of the weights that answer (services/confidence.py)

    @property
    def backend(self) -> str:
        """The backend recorded with each answer: "transformers" (in process) or "vllm"."""
        from medvqa.model.vllm_backend import VLLMClient

        return "vllm" if isinstance(self.loaded, VLLMClient) else BACKEND


@dataclass(frozen=True)
class ImageChoice:
    """Which image the question is about: one slice, a set of slices (a montage), or the study (key slice)."""

    series_id: int | None = None  # None: the study's first series
    slices: int | tuple[int, ...] | None = None  # None: the key slice (middle of the series)
    window: str | Window | None = None  # None: the series' default window


@dataclass(frozen=True)
class AskResult:
    """The stored answer, with the image the model saw and where it came from."""

    answer_id: int
    question_id: int
    study_id: int
    series_id: int
    question: str
    question_type: str
    text: str
    confidence: float | None  # calibrated when the weights carry a calibration, else the model's own
    model_ref: str
    adapter_ref: str | None
    prompt_version: str
    preprocess_hash: str
    latency_ms: float
    image: Image = field(repr=False)
    selection: dict[str, Any] = field(default_factory=dict)
    raw_confidence: float | None = None
    abstained: bool | None = None  # True: below the abstention threshold; None: no calibration judged it
    calibration: dict[str, Any] | None = None  # the calibration applied: file, sha256, methods, kind, threshold

    def provenance(self) -> dict[str, Any]:
        """What produced the answer, as shown in the provenance panel and printed by `medvqa ask --json`."""
        return {
            "model": self.model_ref,
            "adapter": self.adapter_ref or "none (base model)",
            "prompt_version": self.prompt_version,
            "preprocess_hash": self.preprocess_hash,
            "latency_ms": round(self.latency_ms, 1),
            "image": {k: v for k, v in self.selection.items() if k != "instance_uids"},
            "calibration": self.calibration or "none (raw confidence, not calibrated)",
        }


def fill_template(question_type: str, finding: str = "") -> str:
    """The question text of a template; a template with a blank needs the finding."""
    if question_type not in QUESTION_TEMPLATES:
        raise InvalidInput(f"question type {question_type!r}: use one of {', '.join(QUESTION_TEMPLATES)}")
    template = QUESTION_TEMPLATES[question_type][1]
    if "{finding}" in template and not finding.strip():
        raise InvalidInput(f"the {QUESTION_TEMPLATES[question_type][0]} question needs a finding, e.g. 'a fracture'")
    return template.format(finding=finding.strip())


def load_answering_model(db: Database, settings: Settings) -> ServingModel:
    """The workbench's model: MEDVQA_BASE_MODEL (or the default model) with the live adapter, if any."""
    from medvqa.model.adapters import load_adapter
    from medvqa.model.loading import load_vlm
    from medvqa.services.confidence import calibration_for
    from medvqa.services.evaluation import base_model_path, recorded_calibration

    with db.read_session() as session:
        live = session.scalars(select(Adapter).where(Adapter.status == AdapterStatus.LIVE)).first()
        adapter = (live.id, live.path) if live else None
        remote = (live.sha256, live.base_model_ref) if live else (None, None)
    recorded = recorded_calibration(db, adapter[0] if adapter else None)
    adapter_dir = Path(adapter[1]) if adapter else None
    if settings.model_backend == "vllm":
        from medvqa.model.vllm_backend import connect_vllm

        client = connect_vllm(settings, *remote)
        calibration = calibration_for(
            None, adapter_dir, model_ref=client.model_ref, adapter_ref=client.adapter_ref, recorded_sha256=recorded
        )
        return ServingModel(client, adapter_id=adapter[0] if adapter else None, calibration=calibration)
    model_dir = base_model_path(settings)
    loaded = load_vlm(model_dir, device=settings.device)
    if adapter_dir is not None:
        loaded = load_adapter(loaded, adapter_dir)
    calibration = calibration_for(
        model_dir, adapter_dir, model_ref=loaded.model_ref, adapter_ref=loaded.adapter_ref, recorded_sha256=recorded
    )
    return ServingModel(loaded, adapter_id=adapter[0] if adapter else None, calibration=calibration)


def ask(
    db: Database,
    actor: Actor,
    settings: Settings,
    model: ServingModel,
    study_id: int,
    question: str,
    choice: ImageChoice = ImageChoice(),
    question_type: str = "",
    on_text: Callable[[str], None] | None = None,
) -> AskResult:
    """Answer `question` about the chosen image of the study and store question, answer and provenance.
    `on_text` receives the answer so far while it is generated (in-process backend; vLLM answers at once)."""
    from medvqa.model.generation import answer
    from medvqa.model.vllm_backend import VLLMClient

    authorize(db, actor, Action.QUESTION_ASK, "study", study_id)  # refuse before the model runs
    if not question.strip():
        raise InvalidInput("the question is empty; type a question or pick a template")
    question_type = question_type or infer_question_type(question)  # a typed question gets its type by rules
    series_id = resolve_series(db, study_id, choice.series_id)
    slices: int | Sequence[int] | None = list(choice.slices) if isinstance(choice.slices, tuple) else choice.slices
    prepared = model_input(db, actor, series_id, settings, slices=slices, window=choice.window)
    if isinstance(model.loaded, VLLMClient):  # the server batches concurrent requests itself
        result = model.loaded.answer(prepared.image, question)
    else:
        with model.lock:
            result = answer(model.loaded, prepared.image, question, on_text=on_text)
    judged = judge(model.calibration, question, result.confidence)
    calibration = None if judged.calibration is None else judged.calibration | calibration_detail(judged)
    record = AnswerRecord(
        text=result.text,
        model_ref=result.model_ref,
        prompt_version=result.prompt_version,
        preprocess_hash=prepared.preprocess_hash,
        backend=model.backend,
        latency_ms=result.latency_ms,
        confidence=judged.confidence,
        token_scores=result.token_scores,
        adapter_id=model.adapter_id,
        adapter_ref=result.adapter_ref,
        decoding=result.decoding,
        raw_confidence=judged.raw_confidence,
        calibration=calibration,
        abstained=None if calibration is None else judged.abstained,
    )
    row = record_answer(
        db,
        actor,
        study_id,
        question,
        record,
        series_id=series_id,
        image_selection=prepared.selection,
        question_type=question_type,
    )
    return AskResult(
        answer_id=row.id,
        question_id=row.question_id,
        study_id=study_id,
        series_id=series_id,
        question=question,
        question_type=question_type,
        text=result.text,
        confidence=judged.confidence,
        model_ref=result.model_ref,
        adapter_ref=result.adapter_ref,
        prompt_version=result.prompt_version,
        preprocess_hash=prepared.preprocess_hash,
        latency_ms=result.latency_ms,
        image=prepared.image,
        selection=prepared.selection,
        raw_confidence=judged.raw_confidence,
        abstained=record.abstained,
        calibration=calibration,
    )


def calibration_detail(judged: Judged) -> dict[str, Any]:
    """What an answer records of the judgement beside the calibration file: its kind and the threshold."""
    return {"kind": judged.kind, "threshold": judged.threshold, "precision_target": judged.precision_target}


def resolve_series(db: Database, study_id: int, series_id: int | None) -> int:
    """The chosen series of the study, or its first one; refuses a series of another study."""
    with db.read_session() as session:
        if session.get(Study, study_id) is None:
            raise NotFound(f"study {study_id} does not exist")
        ids = list(
            session.scalars(
                select(Series.id).where(Series.study_id == study_id).order_by(Series.series_number, Series.id)
            )
        )
    if not ids:
        raise NotFound(f"study {study_id} has no series")
    if series_id is None:
        return ids[0]
    if series_id not in ids:
        raise NotFound(f"series {series_id} is not part of study {study_id}")
    return series_id


def live_adapter_id(db: Database) -> int | None:
    """The id of the live adapter (None: answers come from the bare base model)."""
    with db.read_session() as session:
        return session.scalar(select(Adapter.id).where(Adapter.status == AdapterStatus.LIVE))


def replay_model_input(db: Database, actor: Actor, settings: Settings, answer_id: int) -> tuple[Image, bool]:
    """Rebuild the image an answer was given for, from its recorded selection; True when its hash still matches
    the one stored with the answer (same pixels, same preprocessing)."""
    with db.read_session() as session:
        found = session.execute(
            select(Question, Answer.preprocess_hash)
            .join(Answer, Answer.question_id == Question.id)
            .where(Answer.id == answer_id)
        ).first()
    if found is None:
        raise NotFound(f"answer {answer_id} does not exist")
    question, stored_hash = found
    selection = question.image_selection
    if question.series_id is None or "slices" not in selection:
        raise NotFound(f"answer {answer_id} has no recorded image selection")
    kind, slices = selection.get("kind"), selection["slices"]
    chosen: int | list[int] | None = None if kind == "key_slice" else slices[0] if kind == "slice" else slices
    prepared = model_input(
        db,
        actor,
        question.series_id,
        settings,
        chosen,
        _recorded_window(selection.get("window", {})),
        selection["size"],
    )
    return prepared.image, prepared.preprocess_hash == stored_hash


def _recorded_window(recorded: dict[str, Any]) -> str | Window | None:
    from medvqa.imaging.series import PRESETS

    name = str(recorded.get("name", ""))
    if name in PRESETS or name == "auto":
        return name
    if "voi_lut_sha256" in recorded or "center" not in recorded:
        return None  # the file's own VOI LUT / default window
    return Window(float(recorded["center"]), float(recorded["width"]), name or "custom")
