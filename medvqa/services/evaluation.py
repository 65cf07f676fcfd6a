"""`medvqa eval`: score a model (and adapter) on a VQA jsonl file, with the blind and shuffled baselines beside it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from sqlalchemy import select

from medvqa.config import Settings
from medvqa.db import Adapter, AdapterStatus
from medvqa.db.engine import Database
from medvqa.errors import NotFound
from medvqa.model.generation import answer_batch
from medvqa.model.loading import load_vlm
from medvqa.services.confidence import RECORDED_KEY, calibration_for, judge
from medvqa.training.data import load_vqa_jsonl
from medvqa.training.evaluate import Batched, compare_with_baselines, evaluate
from medvqa.training.metrics import EvalReport, Prediction

if TYPE_CHECKING:
    from medvqa.model.loading import LoadedModel
    from medvqa.training.calibration import LoadedCalibration


def base_model_path(settings: Settings) -> Path:
    """The checkpoint the workbench answers with: MEDVQA_BASE_MODEL, else the default model (built if absent)."""
    if settings.base_model is not None:
        return settings.base_model
    from medvqa.model.default_weights import ensure_default_model

    return ensure_default_model(settings.home)


def adapter_folder(db: Database, adapter: str | None) -> Path | None:
    """An adapter given by database id or folder; None (no option) means the live adapter, if there is one."""
    return adapter_row(db, adapter)[1]


def adapter_row(db: Database, adapter: str | None) -> tuple[int | None, Path | None]:
    """(database id or None, folder) of an adapter given by id or folder; no option: the live adapter, if any."""
    with db.read_session() as session:
        if adapter is None:
            live = session.scalars(select(Adapter).where(Adapter.status == AdapterStatus.LIVE)).first()
            return (live.id, Path(live.path)) if live else (None, None)
        if adapter.isdigit():
            row = session.get(Adapter, int(adapter))
            if row is None:
                raise NotFound(f"adapter {adapter} does not exist")
            return row.id, Path(row.path)
    folder = Path(adapter)
    if not folder.is_dir():
        raise NotFound(f"adapter {adapter!r} is neither an adapter id nor a folder")
    with db.read_session() as session:
        resolved = str(folder.resolve())
        rows = session.scalars(select(Adapter)).all()
        known = next((row.id for row in rows if str(Path(row.path).resolve()) == resolved), None)
    return known, folder


@dataclass(frozen=True)
class EvaluatedModel:
    """The weights an evaluation or calibration answers with, and the calibration they carry (if any)."""

    loaded: LoadedModel
    model_dir: Path
    adapter_dir: Path | None
    adapter_id: int | None
    calibration: LoadedCalibration | None


def open_evaluated_model(
    db: Database, settings: Settings, model: Path | None, adapter: str | None, *, calibrated: bool = True
) -> EvaluatedModel:
    """An explicit --model runs bare unless --adapter is given; the workbench's model carries the live adapter.
    With `calibrated`, the calibration beside the weights applies, as it does when the workbench answers."""
    from medvqa.model.adapters import load_adapter

    adapter_id, folder = adapter_row(db, adapter) if model is None or adapter is not None else (None, None)
    model_dir = model or base_model_path(settings)
    loaded = load_vlm(model_dir, device=settings.device)
    if folder is not None:
        loaded = load_adapter(loaded, folder)
    calibration = None
    if calibrated:
        recorded = recorded_calibration(db, adapter_id)
        calibration = calibration_for(
            model_dir,
            folder,
            model_ref=loaded.model_ref,
            adapter_ref=loaded.adapter_ref,
            recorded_sha256=recorded,
        )
    return EvaluatedModel(loaded, model_dir, folder, adapter_id, calibration)


def calibrated_predictor(model: EvaluatedModel, batch_size: int = 1) -> Batched:
    """Answers (`batch_size` per generate call) with the confidence a clinician would see (calibrated,
    abstention decided) and the raw one."""

    def many(images: Sequence[Image.Image], questions: Sequence[str]) -> list[str | Prediction]:
        predictions: list[str | Prediction] = []
        for question, result in zip(questions, answer_batch(model.loaded, images, questions), strict=True):
            judged = judge(model.calibration, question, result.confidence)
            predictions.append(Prediction(result.text, judged.confidence, judged.raw_confidence, judged.abstained))
        return predictions

    return Batched(many, batch_size)


def run_evaluation(
    db: Database,
    settings: Settings,
    data: Path,
    *,
    model: Path | None = None,
    adapter: str | None = None,
    limit: int | None = None,
    baselines: bool = True,
    progress: bool = False,
    calibrated: bool = True,
) -> EvalReport:
    """Answer every question of `data` greedily and score it; with `baselines`, again with black images and
    with other images of the file (the blind and shuffled baselines). Each answer keeps its confidence:
    calibrated (and judged for abstention) when the weights carry a calibration and `calibrated` is set."""
    examples = load_vqa_jsonl(data)[:limit]
    evaluated = open_evaluated_model(db, settings, model, adapter, calibrated=calibrated)
    predict = calibrated_predictor(evaluated, settings.eval_batch_size)
    report = (compare_with_baselines if baselines else evaluate)(examples, predict, progress=progress)
    loaded = evaluated.loaded
    return report.with_provenance(model_ref=loaded.model_ref, adapter_ref=loaded.adapter_ref, data=str(data))


def recorded_calibration(db: Database, adapter_id: int | None) -> str | None:
    """The calibration SHA-256 the database recorded for an adapter (by its round or `medvqa calibrate`)."""
    if adapter_id is None:
        return None
    with db.read_session() as session:
        row = session.get(Adapter, adapter_id)
        recorded = (row.metrics or {}).get(RECORDED_KEY) if row else None
    return str(recorded["sha256"]) if isinstance(recorded, dict) and recorded.get("sha256") else None
