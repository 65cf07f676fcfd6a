"""What a clinician must know about the model that answers: whether it is validated for clinical use, what it
is, and how it measured on its locked test set against answering with a black image (the blind baseline).

A model is validated only by an administrator's audited, signed statement covering exactly its weights
(services/validation.py); until then every answer carries the "not validated" banner. The figures come from
the live adapter's round (its locked-test evaluation) or, for the built-in default model, from the metrics
shipped with its weights (the figures of compliance/model_card.md); a model medvqa has not measured says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from medvqa.db import Adapter, AdapterStatus

if TYPE_CHECKING:
    from medvqa.config import Settings
    from medvqa.db.engine import Database

DEFAULT_METRICS = Path(__file__).resolve().parents[1] / "model" / "weights" / "default" / "metrics.json"
DEFAULT_NAME = "the built-in demonstration model (SmolLM2-135M with a small trained vision tower)"
MODEL_CARD = Path(__file__).resolve().parents[2] / "compliance" / "model_card.md"


@dataclass(frozen=True)
class ModelStatus:
    name: str
    validated: bool = False
    closed: float | None = None
    blind_closed: float | None = None
    open_exact: float | None = None
    data: str | None = None
    calibration: dict[str, Any] | None = None  # EvalReport.calibration() on the same data, when measured
    validation: dict[str, Any] | None = None  # the administrator's signed statement, when one covers these weights

    def banner(self) -> str:
        """One paragraph shown with every answer."""
        if self.validated and self.validation:
            signed = str(self.validation["signed_at"])[:10]
            return (
                f"Validated for clinical use by {self.validation['signer']} on {signed}, within this scope: "
                f"{self.validation['statement']}"
            )
        head = "Not validated for clinical use: not for diagnosis. "
        if self.closed is None:
            return f"{head}{self.name}: its accuracy has not been measured by medvqa."
        figures = f"{self.name}: on {self.data or 'its locked test set'} it answered {self.closed:.0%} of yes/no"
        figures += " questions right"
        if self.blind_closed is not None:
            figures += f" ({self.blind_closed:.0%} when shown a black image instead)"
        if self.open_exact is not None:
            figures += f", and {self.open_exact:.0%} of open questions exactly"
        return f"{head}{figures}. Check every answer against the image."


def live_model_status(
    db: Database, settings: Settings, model_ref: str | None = None, adapter_ref: str | None = None
) -> ModelStatus:
    """The status of the model the workbench answers with now (the live adapter's, else its base's). Given the
    refs an answer recorded, it is validated when an administrator's standing, signed validation covers exactly
    those weights (services/validation.py)."""
    status = _measured(db, settings)
    if model_ref is None:
        return status
    from medvqa.services.validation import validation_for

    validation = validation_for(db, model_ref, adapter_ref)
    return replace(status, validated=validation is not None, validation=validation)


def _measured(db: Database, settings: Settings) -> ModelStatus:
    with db.read_session() as session:
        live = session.scalars(select(Adapter).where(Adapter.status == AdapterStatus.LIVE)).first()
        if live is not None:
            return _from_metrics(f"adapter #{live.id} ({live.name})", live.metrics or {})
    if settings.base_model is None:
        try:
            metrics = json.loads(DEFAULT_METRICS.read_text())
        except (OSError, ValueError):
            metrics = {}
        return _from_metrics(
            "the built-in demonstration model (SmolLM2-135M with a small trained vision tower)", metrics
        )
    return ModelStatus(f"the model at {settings.base_model.name}")


def model_card() -> str:
    """compliance/model_card.md, for the page a clinician opens from the banner."""
    try:
        return MODEL_CARD.read_text()
    except OSError:
        return "The model card (compliance/model_card.md) is not installed with this copy of medvqa."


def _from_metrics(name: str, metrics: dict[str, Any]) -> ModelStatus:
    blind = metrics.get("blind") if isinstance(metrics.get("blind"), dict) else {}
    return ModelStatus(
        name=name,
        closed=_fraction(metrics.get("closed_accuracy")),
        blind_closed=_fraction((blind or {}).get("closed_accuracy")),
        open_exact=_fraction(metrics.get("open_exact_match")),
        data=str(metrics["data"]) if metrics.get("data") else None,
        calibration=metrics["calibration"] if isinstance(metrics.get("calibration"), dict) else None,
    )


def _fraction(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and 0 <= value <= 1 else None
