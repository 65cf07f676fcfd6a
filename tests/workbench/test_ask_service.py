"""Asking through the service and the `medvqa ask` / `medvqa feedback` commands, with the tiny LLaVA."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from medvqa.cli import main
from medvqa.db import Answer, AuditEvent, Feedback, Question
from medvqa.errors import AccessDenied, HeldForReview, InvalidInput, NotFound
from medvqa.services.ask import ImageChoice, ask, fill_template, load_answering_model
from medvqa.services.images import load_series
from medvqa.services.queries import StudyFilter, search_studies, study_series
from medvqa.services.viewer import instance_metadata, render_slice, thumbnails
from tests import factories
from tests.phi_factory import phi_strings
from tests.workbench.conftest import import_ct


@pytest.fixture(scope="module")
def serving_cache() -> dict:
    return {}


@pytest.fixture
def model(db, settings, serving_cache):
    key = str(settings.base_model)
    if key not in serving_cache:
        serving_cache[key] = load_answering_model(db, settings)
    return serving_cache[key]


def test_ask_stores_the_answer_with_the_image_and_provenance(db, settings, ct_study, clinician, model):
    study_id, series_id = ct_study
    result = ask(db, clinician, settings, model, study_id, "Is there a fracture?", ImageChoice(slices=1), "PRES")
    with db.read_session() as session:
        row = session.get(Answer, result.answer_id)
        question = session.get(Question, row.question_id)
        event = session.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()
    assert row.text == result.text and row.preprocess_hash == result.preprocess_hash
    assert row.model_ref.startswith(settings.base_model.name + "@") and row.adapter_ref is None
    assert question.image_selection["slices"] == [1] and question.series_id == series_id
    assert question.question_type == "PRES" and question.asked_by == clinician.user_id
    assert event.action == "answer:question:ask" and event.details["preprocess_hash"] == result.preprocess_hash
    assert result.image.size == (384, 384)
    provenance = result.provenance()
    assert set(provenance) == {
        "model",
        "adapter",
        "prompt_version",
        "preprocess_hash",
        "latency_ms",
        "image",
        "calibration",
    }
    assert provenance["calibration"] == "none (raw confidence, not calibrated)"  # the tiny model carries none
    assert row.abstained is None and row.raw_confidence == row.confidence == result.confidence
    montage = ask(db, clinician, settings, model, study_id, "Is this normal?", ImageChoice(slices=(0, 1, 2)))
    assert montage.selection["kind"] == "montage" and montage.preprocess_hash != result.preprocess_hash
    assert montage.question_type == "ABN"  # typed without a template: the type is inferred and stored
    with db.read_session() as session:
        assert session.get(Question, session.get(Answer, montage.answer_id).question_id).question_type == "ABN"


@pytest.mark.parametrize(
    ("question", "choice", "error", "message"),
    [
        ("   ", ImageChoice(), InvalidInput, "question is empty"),
        ("Is it?", ImageChoice(slices=7), InvalidInput, "slice 7 does not exist"),
        ("Is it?", ImageChoice(series_id=999_999), NotFound, "is not part of study"),
        ("Is it?", ImageChoice(window="ct_nonsense"), InvalidInput, "unknown window"),
    ],
)
def test_bad_choices_are_refused_and_store_nothing(
    db, settings, ct_study, clinician, model, question, choice, error, message
):
    with pytest.raises(error, match=message):
        ask(db, clinician, settings, model, ct_study[0], question, choice)
    with db.read_session() as session:
        assert session.scalar(select(func.count(Answer.id))) == 0


def test_roles_that_may_not_ask_are_refused_and_audited(db, settings, ct_study, model):
    engineer = factories.make_user(db, "ml_engineer")
    with pytest.raises(AccessDenied, match="may not perform answer:question:ask"):
        ask(db, engineer, settings, model, ct_study[0], "Is there a fracture?")
    with db.read_session() as session:
        denied = session.scalars(select(AuditEvent).where(AuditEvent.outcome == "denied")).all()
    assert [(e.actor_name, e.action) for e in denied] == [(engineer.name, "answer:question:ask")]


def test_held_instances_cannot_be_asked_about(db, settings, tmp_path, clinician, model):
    study_id, _ = import_ct(db, settings, tmp_path / "us", count=1, modality="US")
    with pytest.raises(HeldForReview, match="reviewer must confirm"):
        ask(db, clinician, settings, model, study_id, "Is there a fracture?")


def test_templates_fill_in_the_finding():
    assert fill_template("PRES", "a fracture") == "Is there a fracture in this image?"
    assert fill_template("PLANE") == "In which plane is this image taken?"
    with pytest.raises(InvalidInput, match="needs a finding"):
        fill_template("SIZE", " ")
    with pytest.raises(InvalidInput, match="question type 'COLOR'"):
        fill_template("COLOR")


def test_study_search_and_series_listing(db, settings, ct_study, clinician, tmp_path):
    import_ct(db, settings, tmp_path / "us", count=1, modality="US")
    everything = search_studies(db, clinician)
    assert {row["modality"] for row in everything} == {"CT", "US"}
    assert [row["id"] for row in search_studies(db, clinician, StudyFilter(modality="CT"))] == [ct_study[0]]
    imported = everything[0]["imported_at"][:10]
    from datetime import date, timedelta

    day = date.fromisoformat(imported)
    assert len(search_studies(db, clinician, StudyFilter(imported_from=day, imported_to=day))) == 2
    assert search_studies(db, clinician, StudyFilter(imported_from=day + timedelta(days=1))) == []
    assert search_studies(db, clinician, StudyFilter(text="no-such-uid")) == []
    series = study_series(db, clinician, ct_study[0])
    assert [(s["id"], s["instances"], s["held"]) for s in series] == [(ct_study[1], 3, 0)]


def test_viewer_windows_slices_quickly_and_shows_only_deidentified_tags(db, settings, ct_study, clinician):
    volume = load_series(db, clinician, ct_study[1], settings)
    image = render_slice(volume, 0, "ct_bone")
    low, high = volume.window("ct_bone").low, volume.window("ct_bone").high
    expected = (np.clip((volume.pixels[0] - low) / (high - low), 0, 1) * 255 + 0.5).astype(np.uint8)
    assert image.dtype == np.uint8 and np.array_equal(image, expected)
    assert not np.array_equal(render_slice(volume, 0, "ct_lung"), image)
    with pytest.raises(InvalidInput, match="slice 3 does not exist"):
        render_slice(volume, 3)
    assert [index for index, _ in thumbnails(volume, count=8)] == [0, 1, 2]
    tags = instance_metadata(db, clinician, settings, volume, 1)
    assert tags["Modality"] == "CT" and tags["PatientIdentityRemoved"] == "YES"
    shown = json.dumps(tags)
    assert not [phi for phi in phi_strings() if phi in shown]
    start = time.perf_counter()
    for index in range(100):
        render_slice(volume, index % 3, "ct_abdomen")
    assert (time.perf_counter() - start) / 100 < 0.05


def test_cli_ask_then_feedback_twice_is_one_record(db, app_env, ct_study, clinician):
    runner = CliRunner()
    password = factories.PASSWORD + "\n"
    args = ["ask", "--study", str(ct_study[0]), "--question", "Is there a fracture?", "--slice", "1"]
    result = runner.invoke(main, [*args, "--user", clinician.name, "--json"], input=password)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["provenance"]["image"]["slices"] == [1] and payload["provenance"]["prompt_version"] == "vqa-v1"
    rate = ["feedback", str(payload["answer_id"]), "--verdict", "partial", "--correction", "a small one"]
    first = runner.invoke(main, [*rate, "--user", clinician.name, "--json"], input=password)
    again = runner.invoke(main, [*rate, "--user", clinician.name, "--json"], input=password)
    assert first.exit_code == 0 and again.exit_code == 0, first.output + again.output
    assert json.loads(first.stdout)["created"] is True and json.loads(again.stdout)["created"] is False
    with db.read_session() as session:
        assert session.scalar(select(func.count(Feedback.id))) == 1


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["ask", "--study", "2.25.1", "--question", "Is it?"], factories.PASSWORD, "study '2.25.1' does not exist"),
        (["ask", "--study", "1", "--question", "Is it?"], "wrong password!!", "sign-in failed"),
        (["feedback", "999", "--verdict", "correct"], factories.PASSWORD, "answer 999 does not exist"),
        (["feedback", "1", "--verdict", "maybe"], factories.PASSWORD, None),
    ],
)
def test_cli_bad_input_is_one_line(db, app_env, clinician, args, stdin, message):
    result = CliRunner().invoke(main, [*args, "--user", clinician.name], input=stdin + "\n")
    if message is None:  # click's own usage error for a value outside the choices
        assert result.exit_code == 2 and "'maybe' is not one of" in result.output
        return
    assert result.exit_code == 1 and message in result.stderr and result.stderr.count("\n") == 1
