"""One confidence policy for every backend: the model's raw confidence, calibrated by the `calibration.json` of
the weights that answered, and the abstention that follows from it.

The in-process model and the vLLM client both give a raw confidence; `judge` turns it into what a clinician
sees, so the same answer gets the same confidence whichever backend produced it. Which calibration file
applies: the adapter's folder when an adapter answers, else the base model's folder.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvqa.errors import InvalidInput
from medvqa.training.calibration import CALIBRATION_FILE, LoadedCalibration, load_calibration

if TYPE_CHECKING:
    from medvqa.training.metrics import EvalReport


RECORDED_KEY = "calibration_file"  # where an adapter row's metrics keep the calibration file's hash and summary


class CalibrationMismatch(InvalidInput):
    """The calibration file beside the weights is not the one recorded for them (changed or removed)."""


@dataclass(frozen=True)
class Judged:
    """An answer's confidence as shown, and whether it is presented as an answer at all."""

    kind: str  # "closed" (yes/no question) or "open"
    confidence: float | None  # calibrated when a calibration applies, else the raw one
    raw_confidence: float | None
    abstained: bool
    calibration: dict[str, Any] | None  # provenance of the calibration applied (file, sha256, methods)
    threshold: float | None = None  # the kind's abstention threshold, when one applies
    precision_target: float | None = None  # what the threshold was chosen to reach on held-out answers


def answer_kind(question: str) -> str:
    """The calibration kind of a question: closed (yes/no) or open, by the same rule the confidence uses."""
    from medvqa.model.prompts import is_closed_question

    return "closed" if is_closed_question(question) else "open"


def judge(calibration: LoadedCalibration | None, question: str, raw: float | None) -> Judged:
    """Calibrate `raw` and decide abstention; without a calibration the raw confidence stands, unjudged."""
    kind = answer_kind(question)
    if calibration is None:
        return Judged(kind, raw, raw, False, None)
    calibrated = calibration.calibration.apply(kind, raw)
    entry = calibration.calibration.kinds[kind]
    abstained = calibration.calibration.abstains(kind, calibrated)
    provenance = calibration.provenance()
    return Judged(kind, calibrated, raw, abstained, provenance, entry.threshold, entry.precision_target)


def calibration_for(
    model_dir: Path | None,
    adapter_dir: Path | None,
    *,
    model_ref: str | None,
    adapter_ref: str | None,
    recorded_sha256: str | None = None,
) -> LoadedCalibration | None:
    """The calibration of the weights that answer: the adapter's when an adapter answers, else the model's.

    `recorded_sha256` is the hash a round recorded for the adapter's calibration: a file that no longer matches
    it (edited, replaced or removed) raises CalibrationMismatch rather than answering with thresholds nobody
    fitted. A file fitted for other weights raises InvalidInput (see `load_calibration`).
    """
    folder = adapter_dir if adapter_dir is not None else model_dir
    if folder is None:
        return None
    loaded = load_calibration(folder, model_ref=model_ref, adapter_ref=adapter_ref)
    found = loaded.sha256 if loaded else None
    if recorded_sha256 is not None and found != recorded_sha256:
        state = "is missing" if found is None else f"has SHA-256 {found[:12]}…"
        raise CalibrationMismatch(
            f"{folder / CALIBRATION_FILE} {state}, but {recorded_sha256[:12]}… was recorded for these weights; "
            "restore it or refit it with `medvqa calibrate`"
        )
    return loaded


def recalibrated(report: EvalReport, calibration: LoadedCalibration | None) -> EvalReport:
    """The report as answering with `calibration` would have shown it: calibration is a function of the question
    and the raw confidence alone, so answers scored raw need no second run of the model."""
    examples = []
    for item in report.examples:
        judged = judge(calibration, item.question, item.raw_confidence)
        examples.append(replace(item, confidence=judged.confidence, abstained=judged.abstained))
    return replace(
        report,
        examples=tuple(examples),
        blind=recalibrated(report.blind, calibration) if report.blind else None,
        shuffled=recalibrated(report.shuffled, calibration) if report.shuffled else None,
    )
