"""`medvqa calibrate`: fit the confidence calibration and abstention thresholds of a model (or adapter) on
held-out questions, write `calibration.json` beside its weights, and record and audit it.

Held-out means not trained on and never the locked test set: a file that shares a (question, image) pair with
the locked test set is refused. For an adapter the database knows, the file's SHA-256 is recorded on the
adapter's row in the same transaction as the audit event, so answering refuses a file changed afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from compliance.policy import Action
from medvqa.config import Settings
from medvqa.db import Adapter
from medvqa.db.engine import Database
from medvqa.errors import InvalidInput
from medvqa.hashing import file_sha256
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.confidence import RECORDED_KEY, answer_kind
from medvqa.services.evaluation import calibrated_predictor, open_evaluated_model
from medvqa.services.transaction import write
from medvqa.training.calibration import CALIBRATION_FILE, Calibration, fit_calibration
from medvqa.training.data import VQAExample, load_vqa_jsonl
from medvqa.training.evaluate import evaluate
from medvqa.training.metrics import EvalReport, normalize_answer


@dataclass(frozen=True)
class CalibrationOutcome:
    path: Path
    sha256: str
    calibration: Calibration
    raw: dict[str, Any]  # EvalReport.calibration() of the held-out answers, raw confidences
    adapter_id: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "adapter_id": self.adapter_id,
            "calibration": self.calibration.to_json(),
            "held_out_raw": self.raw,
        }


def precision_targets(settings: Settings) -> dict[str, float]:
    return {"closed": settings.abstain_precision_closed, "open": settings.abstain_precision_open}


def check_not_locked(settings: Settings, examples: Sequence[VQAExample], data: Path) -> None:
    """Refuse held-out data that is, or overlaps, the locked test set (by question wording and image pixels)."""
    if settings.locked_test_set is None:
        return
    from medvqa.training.locked_test import image_pixel_hash, load_locked_test_set

    locked = load_locked_test_set(settings.locked_test_set)
    if file_sha256(data) == locked.sha256:
        raise InvalidInput(f"{data} is the locked test set; calibrate on held-out training data, never on it")
    pixels: dict[Path, str] = {}

    def pair(example: VQAExample) -> tuple[str, str]:
        if example.image_path not in pixels:
            pixels[example.image_path] = image_pixel_hash(example.image_path)
        return normalize_answer(example.question), pixels[example.image_path]

    locked_pairs = {pair(example) for example in locked.examples}
    shared = sum(1 for example in examples if pair(example) in locked_pairs)
    if shared:
        raise InvalidInput(
            f"{data} asks {shared} question(s) of the locked test set about the same image; "
            "calibrate on held-out training data, never on the locked test set"
        )


def fit_model_calibration(
    db: Database,
    actor: Actor,
    settings: Settings,
    data: Path,
    *,
    model: Path | None = None,
    adapter: str | None = None,
    progress: bool = False,
) -> CalibrationOutcome:
    """Answer every question of `data` with the raw model, fit, write calibration.json, record and audit it."""
    authorize(db, actor, Action.MODEL_CALIBRATE, "model")
    examples = load_vqa_jsonl(data)
    check_not_locked(settings, examples, data)
    evaluated = open_evaluated_model(db, settings, model, adapter, calibrated=False)
    report = evaluate(examples, calibrated_predictor(evaluated, settings.eval_batch_size), progress=progress)
    loaded = evaluated.loaded
    calibration = calibration_from_report(report, settings, loaded.model_ref, loaded.adapter_ref, data)
    folder = evaluated.adapter_dir or evaluated.model_dir
    path, sha256 = save_recorded(db, actor, calibration, folder, evaluated.adapter_id)
    return CalibrationOutcome(path, sha256, calibration, report.calibration(), evaluated.adapter_id)


def calibration_from_report(
    report: EvalReport, settings: Settings, model_ref: str | None, adapter_ref: str | None, data: Path
) -> Calibration:
    """Fit from a report of raw-confidence answers to held-out questions."""
    pairs = [(answer_kind(item.question), item.raw_confidence, item.exact_match) for item in report.examples]
    return fit_calibration(
        pairs, precision_targets=precision_targets(settings), model_ref=model_ref, adapter_ref=adapter_ref, data=data
    )


def summary(calibration: Calibration, sha256: str) -> dict[str, Any]:
    """What the adapter row and the audit event keep: the file's hash and, per kind, method and threshold."""
    kinds = {
        kind: {"method": entry.calibrator.method, "threshold": entry.threshold, "held_out": entry.held_out}
        for kind, entry in calibration.kinds.items()
    }
    return {"sha256": sha256, "data_sha256": calibration.data_sha256, "kinds": kinds}


def save_recorded(
    db: Database, actor: Actor, calibration: Calibration, folder: Path, adapter_id: int | None
) -> tuple[Path, str]:
    """Write folder/calibration.json and, in one transaction, record its hash on the adapter row (when the
    database knows the adapter) and audit it; a failed transaction puts the previous file back."""
    target = folder / CALIBRATION_FILE
    previous = target.read_bytes() if target.is_file() else None
    path, sha256 = calibration.save(folder)
    details = summary(calibration, sha256) | {"folder": folder.name, "adapter_id": adapter_id}

    def work(session: Session) -> None:
        if adapter_id is not None:
            row = session.get(Adapter, adapter_id)
            if row is not None:
                row.metrics = {**(row.metrics or {}), RECORDED_KEY: summary(calibration, sha256)}
        audit.record(
            session, actor, Action.MODEL_CALIBRATE, "adapter" if adapter_id else "model", adapter_id, details=details
        )

    try:
        write(db, work)
    except BaseException:
        if previous is None:
            target.unlink(missing_ok=True)
        else:
            target.write_bytes(previous)
        raise
    return path, sha256
