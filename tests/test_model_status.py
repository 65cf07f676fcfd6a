"""The banner shown with every answer: not validated for clinical use, what the model is, and its figures."""

from __future__ import annotations

import pytest

from medvqa.config import load_settings
from medvqa.db import AdapterStatus
from medvqa.services.model_status import live_model_status, model_card
from tests.workbench.test_review_models_audit_services import make_adapter

pytestmark = pytest.mark.db


def test_the_default_model_shows_its_shipped_test_figures(db, tmp_path):
    status = live_model_status(db, load_settings(home=tmp_path))
    assert not status.validated and (status.closed, status.blind_closed, status.open_exact) == (0.596, 0.57, 0.162)
    assert status.banner() == (
        "Not validated for clinical use: not for diagnosis. the built-in demonstration model (SmolLM2-135M with a "
        "small trained vision tower): on VQA-RAD test.jsonl (451 questions: 272 closed, 179 open) it answered 60% "
        "of yes/no questions right (57% when shown a black image instead), and 16% of open questions exactly. "
        "Check every answer against the image."
    )
    assert "59.6%" in model_card()  # the same figures as the model card the banner opens
    # how far its (raw) confidences held on the same 451 questions, for the Models page
    closed, opened = status.calibration["closed"], status.calibration["open"]
    assert (closed["n"], opened["n"]) == (272, 179) and closed["accuracy"] == pytest.approx(0.596, abs=1e-3)
    assert closed["ece"] == pytest.approx(0.088, abs=1e-3) and opened["ece"] == pytest.approx(0.299, abs=1e-3)


def test_a_live_adapter_shows_its_rounds_figures(db, tmp_path):
    metrics = {"closed_accuracy": 0.7, "open_exact_match": 0.2, "blind": {"closed_accuracy": 0.55}}
    make_adapter(db, "round-3", AdapterStatus.LIVE, metrics)
    status = live_model_status(db, load_settings(home=tmp_path))
    assert status.name.endswith("(round-3)") and (status.closed, status.blind_closed) == (0.7, 0.55)
    assert status.banner().startswith("Not validated for clinical use: not for diagnosis. adapter #")


def test_a_model_medvqa_has_not_measured_says_so(db, tmp_path):
    status = live_model_status(db, load_settings(home=tmp_path, base_model=tmp_path / "my-vlm"))
    assert status.banner() == (
        "Not validated for clinical use: not for diagnosis. the model at my-vlm: its accuracy has not been measured "
        "by medvqa."
    )
