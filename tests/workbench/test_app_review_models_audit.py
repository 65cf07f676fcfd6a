"""The Review, Models and Audit pages through AppTest, on a real SQLite database."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from medvqa.db import Adapter, AdapterStatus, AuditEvent, Instance, Review
from medvqa.training.data import VQAExample
from medvqa.training.metrics import Prediction, score
from tests import factories
from tests.workbench.apptest import errors, on_page, signed_in
from tests.workbench.conftest import import_ct
from tests.workbench.test_review_models_audit_services import make_adapter, status_of


def by_label(app, label):
    return next(button for button in app.button if button.label == label)


def adjudicate_in_app(app, verdict, reference, password):
    if verdict is not None:
        app.radio[0].set_value(verdict)
    app.text_input[0].input(reference)
    app.text_input[1].input(password)
    by_label(app, "Sign and submit").click()
    return app.run()


def test_review_queue_adjudication_with_signature_and_double_reading(db, app_env, ct_study, clinician):
    from medvqa.config import load_settings
    from medvqa.services.ask import ImageChoice, ask, load_answering_model

    settings = load_settings()
    model = load_answering_model(db, settings)
    answer = ask(db, clinician, settings, model, ct_study[0], "Is there a fracture?", ImageChoice(slices=0))
    first, second = factories.make_user(db, "reviewer"), factories.make_user(db, "reviewer")
    app = on_page(first, "app_pages/review.py")
    assert not app.exception
    assert app.selectbox(key="r_answer").value == answer.answer_id
    assert answer.text in [element.value for element in app.text]
    assert any(image.proto.imgs[0].caption == "the image the model saw" for image in app.get("image"))
    assert app.radio[0].value is None  # no verdict preselected
    app = adjudicate_in_app(app, None, "no fracture", factories.PASSWORD)
    assert errors(app) == ["Choose a verdict first: nothing was signed or recorded."]
    with db.read_session() as session:
        assert session.scalars(select(Review)).all() == []
    app = adjudicate_in_app(app, "incorrect", "no fracture", "not my password")
    assert errors(app) == ["signature refused: the password does not match the signed-in account"]
    app = adjudicate_in_app(app, "incorrect", "no fracture", factories.PASSWORD)
    assert f"Answer {answer.answer_id} adjudicated and signed." in [s.value for s in app.success]
    assert any(c.value.startswith("0 answer(s) to judge") for c in app.caption)  # first reader's queue is empty
    second_app = on_page(second, "app_pages/review.py")
    adjudicate_in_app(second_app, "correct", "", factories.PASSWORD)
    with db.read_session() as session:
        readings = [
            (r.reviewer_id, r.reading, r.verdict.value, r.signature_meaning) for r in session.scalars(select(Review))
        ]
    assert readings == [(first.user_id, 1, "incorrect", "review"), (second.user_id, 2, "correct", "review")]
    agreement = on_page(second, "app_pages/review.py")
    # one pair that disagrees: p_o = 0, p_e = 0, kappa = 0
    assert [m.value for m in agreement.metric] == ["0.00", "1"]
    assert len(agreement.get("vega_lite_chart")) == 1  # the chart, once there is a pair


def test_held_instances_are_confirmed_on_the_review_page(db, app_env, settings, tmp_path):
    import_ct(db, settings, tmp_path / "us", count=1, modality="US")
    reviewer = factories.make_user(db, "reviewer")
    app = on_page(reviewer, "app_pages/review.py")
    with db.read_session() as session:
        instance_id = session.scalars(select(Instance.id)).one()
    app.button(key=f"confirm_{instance_id}").click().run()
    assert f"Instance {instance_id} confirmed; questions about it are allowed now." in [s.value for s in app.success]
    with db.read_session() as session:
        assert session.get(Instance, instance_id).burned_in_confirmed_by == reviewer.user_id


def test_promotion_needs_a_request_by_an_engineer_and_approval_by_an_admin(db, app_env):
    candidate = make_adapter(db, "round1", metrics={"by_question_type": {"PRES": {"overall_accuracy": 0.6}}})
    engineer, admin = factories.make_user(db, "ml_engineer"), factories.make_user(db, "admin")
    app = signed_in(engineer).run()
    assert not app.exception and app.selectbox(key="m_adapter").value == candidate
    shown = json.loads(app.json[0].value)
    assert shown["by_question_type"] == {"PRES": {"overall_accuracy": 0.6}} and shown["gate"]["passed"] is True
    assert app.get("vega_lite_chart") or app.get("vega_lite_chart")  # candidate vs live per question type
    app.button(key="m_approve")  # disabled until requested
    app.text_input(key="m_reason").input("better on the locked test set")
    app.button(key="m_request").click().run()
    assert "an admin must approve it" in app.success[0].value
    app.button(key="m_approve").click().run()
    assert errors(app) == [f"{engineer.name}: role 'ml_engineer' may not perform model:adapter:approve_promotion"]
    admin_app = signed_in(admin).run()
    admin_app.button(key="m_approve").click().run()
    assert status_of(db) == {"round1": "live"}
    admin_app.text_input(key="m_reason").input("regression seen in clinic")
    admin_app.button(key="m_rollback").click().run()
    assert status_of(db) == {"round1": "retired"}
    with db.read_session() as session:
        denied = session.scalars(select(AuditEvent).where(AuditEvent.outcome == "denied")).all()
        assert session.get(Adapter, candidate).promoted_at is not None
    assert [(e.actor_name, e.action) for e in denied] == [(engineer.name, "model:adapter:approve_promotion")]


def test_audit_page_filters_verifies_and_exports(db, app_env, clinician):
    auditor = factories.make_user(db, "auditor")
    factories.make_answer(db, clinician)
    app = signed_in(auditor).run()
    assert not app.exception
    app.selectbox(key="a_user").set_value(clinician.name).run()
    shown = app.dataframe[0].value
    assert set(shown["actor_name"]) == {clinician.name}
    app.button(key="verify").click().run()
    assert app.success[0].value.startswith("Audit trail OK")
    app.button(key="export").click().run()
    rows = list(csv.DictReader(io.StringIO(app.session_state["audit_csv"])))
    assert {row["actor_name"] for row in rows} == {clinician.name}
    assert app.get("download_button")
    with db.read_session() as session:
        actions = [e.action for e in session.scalars(select(AuditEvent).where(AuditEvent.actor_name == auditor.name))]
    assert actions == ["audit:chain:verify", "audit:event:export"]


def test_audit_page_shows_a_broken_chain(db, app_env, clinician, anchor_path):
    auditor = factories.make_user(db, "auditor")
    anchor_path.unlink()  # the chain heads kept outside the database are gone
    app = signed_in(auditor).run()
    app.button(key="verify").click().run()
    assert errors(app) and errors(app)[0].startswith("Audit trail BROKEN at event")


def test_agreement_without_double_readings_shows_a_sentence_not_an_empty_chart(db, app_env):
    reviewer = factories.make_user(db, "reviewer")
    app = on_page(reviewer, "app_pages/review.py")
    assert not app.exception
    notices = [element.value for element in app.info]
    assert "No answer has been read by two reviewers yet: agreement appears once one has." in notices
    assert app.get("vega_lite_chart") == [] and [m.value for m in app.metric] == ["-", "0"]


def test_models_page_shows_how_far_the_live_models_confidences_hold(db, app_env):
    engineer = factories.make_user(db, "ml_engineer")
    app = signed_in(engineer).run()
    assert any("have not been measured" in info.value for info in app.info)  # the tiny model: never measured
    examples = [
        VQAExample(
            str(i),
            Path("x.png"),
            "Is it?" if i % 2 else "Where?",
            "yes",
            "CLOSED" if i % 2 else "OPEN",
            "PRES",
            "CHEST",
        )
        for i in range(40)
    ]
    report = score(examples, [Prediction("yes" if i % 3 else "no", 0.5 + i / 100, 0.5 + i / 100) for i in range(40)])
    make_adapter(db, "calibrated", AdapterStatus.LIVE, metrics={"calibration": report.calibration(), "data": "t.jsonl"})
    app = signed_in(engineer).run()
    assert not app.exception and not errors(app)
    [table] = [frame.value for frame in app.dataframe if "ECE" in frame.value.columns]
    assert list(table["answers"]) == ["closed", "open"] and list(table["n"]) == [20, 20]
    assert table["ECE"][0] == pytest.approx(report.calibration()["closed"]["ece"])
    captions = [str(image.proto) for image in app.get("image")]
    assert any("Reliability" in caption for caption in captions) and any("Risk-coverage" in c for c in captions)


def test_a_reviewer_opens_the_whole_study_from_a_queue_item(db, app_env, ct_study, clinician, settings, tmp_path):
    from medvqa.services.ask import ImageChoice, ask, load_answering_model

    import_ct(db, settings, tmp_path / "mr", count=2, modality="MR")  # another study, so the choice matters
    answer = ask(
        db, clinician, settings, load_answering_model(db, settings), ct_study[0], "Is it normal?", ImageChoice(slices=2)
    )
    reviewer = factories.make_user(db, "reviewer")
    app = on_page(reviewer, "app_pages/review.py")
    app.selectbox(key="r_answer").set_value(answer.answer_id).run()
    app.button(key=f"open_study_{answer.answer_id}").click().run()
    assert not app.exception and not errors(app)
    assert app.selectbox(key="study_id").value == ct_study[0]  # the Ask page, on the answer's study
    assert app.slider(key=f"slice_{ct_study[1]}").max == 2  # every slice of the series, not only the one asked about
    assert "Is it normal?" in [element.value for element in app.text]  # its conversation comes with it


def test_an_ml_engineer_starts_a_round_from_the_models_page_and_reads_how_it_ended(db, app_env):
    """No locked test set is configured here, so the round's own process refuses: the page shows the job as it
    runs, then how it ended, and offers to start again; nothing about the job lives in the browser session."""
    import time

    from medvqa.services.round_jobs import RUNNING, latest_job

    engineer = factories.make_user(db, "ml_engineer")
    app = signed_in(engineer).run()
    assert any("0 reviewed answers usable for training" in caption.value for caption in app.caption)
    assert any("No round has been run yet" in caption.value for caption in app.caption)
    app.number_input(key="r_steps").set_value(2)
    by_label(app, "Start a round").click().run()
    assert not app.exception and not errors(app)
    from medvqa.config import load_settings

    deadline = time.monotonic() + 120
    while latest_job(db, engineer, load_settings()).state == RUNNING and time.monotonic() < deadline:
        time.sleep(0.5)
    later = signed_in(engineer).run()  # a new browser session: the job is read from disk
    [warning] = [w.value for w in later.warning if "The last round job" in w.value]
    assert "failed" in warning and "MEDVQA_LOCKED_TEST_SET" in warning
    assert any(button.label == "Start a round" for button in later.button)
    with db.read_session() as session:
        started = session.scalars(select(AuditEvent).where(AuditEvent.action == "training:round:start")).all()
    assert [event.actor_name for event in started] == [engineer.name]


def test_a_running_round_shows_its_progress_and_log_and_can_be_cancelled(db, app_env, monkeypatch):
    from medvqa.config import load_settings
    from medvqa.services import round_jobs

    engineer = factories.make_user(db, "ml_engineer")
    settings = load_settings()
    job = round_jobs.start_round_job(db, engineer, settings, round_jobs.JobOptions(max_steps=2))
    (round_jobs.jobs_dir(settings) / job.name / "log.txt").write_text("Training:  40%|####      | 2/5 [00:01<00:02]\n")
    monkeypatch.setattr(round_jobs, "process_running", lambda pid: True)  # as if still training
    app = signed_in(engineer).run()
    assert any(f"Round job {job.name}" in info.value for info in app.info)
    assert app.get("progress")[0].proto.value == 40
    assert any("2/5" in code.value for code in app.code)
    by_label(app, "Cancel the round").click().run()
    assert not app.exception and round_jobs.latest_job(db, engineer, settings).state == "cancelled"
