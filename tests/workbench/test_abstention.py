"""Abstention in the product: with a calibration beside the weights, an answer below its threshold is stored as
abstained (with the raw and calibrated confidence and the calibration's hash), is not presented as an answer on
the Ask page or by `medvqa ask`, and goes to the top of the review queue. A calibration fitted for other weights
stops the model from loading, in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from medvqa.cli import main
from medvqa.db import Answer
from medvqa.errors import InvalidInput
from medvqa.model.loading import load_vlm
from medvqa.services.ask import ImageChoice, ask, load_answering_model
from medvqa.services.audit import verify
from medvqa.services.review import review_queue
from medvqa.training.calibration import MIN_FIT, Calibration, Calibrator, KindCalibration
from tests import factories
from tests.workbench.apptest import errors, signed_in

# Every answer calibrated to sigmoid(4) = 0.982, below the 0.99 threshold: a confident-looking abstention.
ABSTAIN = KindCalibration(Calibrator("platt", slope=0.0, intercept=4.0), 0.99, 0.85, MIN_FIT)


@pytest.fixture
def calibrated_model(app_env, tiny_checkpoints, tmp_path, monkeypatch):
    """A private copy of the tiny model, with a calibration.json under which every answer abstains."""
    folder = Path(shutil.copytree(tiny_checkpoints("llava"), tmp_path / "calibrated-model"))
    model_ref = load_vlm(folder, device="cpu").model_ref
    calibration = Calibration({"closed": ABSTAIN, "open": ABSTAIN}, model_ref, None, "held.jsonl", "0" * 64, "now")
    _, sha256 = calibration.save(folder)
    monkeypatch.setenv("MEDVQA_BASE_MODEL", str(folder))
    return folder, sha256


def test_an_abstained_answer_is_stored_as_such_and_read_first(db, ct_study, clinician, calibrated_model):
    from medvqa.config import load_settings

    _, sha256 = calibrated_model
    settings = load_settings()
    model = load_answering_model(db, settings)
    reviewer = factories.make_user(db, "reviewer")
    other = factories.make_answer(db, clinician)  # confidence 0.8, no calibration: would come first by confidence
    result = ask(db, clinician, settings, model, ct_study[0], "Is there a fracture?", ImageChoice(slices=1))
    assert result.abstained is True and result.confidence == pytest.approx(0.982, abs=1e-3)
    assert result.provenance()["calibration"]["sha256"] == sha256
    with db.read_session() as session:
        row = session.get(Answer, result.answer_id)
        assert row.abstained is True and row.raw_confidence == result.raw_confidence
        assert row.calibration["sha256"] == sha256 and row.calibration["threshold"] == 0.99
        assert row.calibration["kind"] == "closed" and session.get(Answer, other).abstained is None
    queue = review_queue(db, reviewer)
    assert [item["answer_id"] for item in queue][:2] == [result.answer_id, other]
    assert queue[0]["abstained"] is True
    assert verify(db).ok  # answers with and without the new columns both verify


def test_medvqa_ask_says_it_is_not_confident(db, app_env, ct_study, clinician, calibrated_model):
    args = ["ask", "--study", str(ct_study[0]), "--question", "Where is the lesion?", "--slice", "1"]
    as_json = CliRunner().invoke(main, [*args, "--user", clinician.name, "--json"], input=factories.PASSWORD + "\n")
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.stdout)
    assert payload["abstained"] is True and payload["raw_confidence"] is not None
    assert payload["provenance"]["calibration"]["kind"] == "open"
    text = CliRunner().invoke(main, [*args, "--user", clinician.name], input=factories.PASSWORD + "\n")
    assert "not confident enough to answer" in text.stdout and "(calibrated)" in text.stdout


def test_the_ask_page_withholds_the_answer_until_asked_for(db, app_env, ct_study, clinician, calibrated_model):
    app = signed_in(clinician).run()
    app.text_input(key="question").input("Is there a fracture?")
    app.button(key="ask").click().run()
    assert not app.exception and not errors(app)
    result = app.session_state["answer"]
    assert result.abstained
    [notice] = [w.value for w in app.warning if "not confident enough to answer" in w.value]
    assert "below the threshold 0.99" in notice and "top of the review queue" in notice
    raw_line = f"Raw answer (not confident): {result.text or '(none)'}"
    assert raw_line not in [t.value for t in app.text]
    app.toggle(key=f"raw_{result.answer_id}").set_value(True).run()
    assert raw_line in [t.value for t in app.text]
    assert any("(calibrated)" in str(bar.proto.text) for bar in app.get("progress"))


def test_a_calibration_for_other_weights_stops_loading_in_one_line(db, app_env, calibrated_model):
    from medvqa.config import load_settings

    folder, _ = calibrated_model
    data = json.loads((folder / "calibration.json").read_text())
    data["model_ref"] = "other@ffffffffffff"
    (folder / "calibration.json").write_text(json.dumps(data))
    with pytest.raises(InvalidInput, match="was fitted for model") as raised:
        load_answering_model(db, load_settings())
    assert "\n" not in str(raised.value)
