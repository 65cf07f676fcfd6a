"""The Ask page's "Find in PACS" panel through AppTest, against the real Orthanc the fixture starts."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from medvqa.db import AuditEvent, Study
from tests.pacs_server import seed_study
from tests.workbench.apptest import errors, signed_in

pytestmark = pytest.mark.db


@pytest.fixture
def panel_env(app_env, pacs_env):
    return {**app_env, **pacs_env}


def search(app, **fields):
    app.run()
    for key, value in fields.items():
        app.text_input(key=f"pacs_{key}").input(value)
    app.button(key="FormSubmitter:pacs_find-Search the PACS").click()
    return app.run()


def test_a_clinician_finds_retrieves_and_opens_a_study(db, panel_env, pacs_server, clinician):
    study = seed_study(pacs_server, patient_id="PANEL-PID-1", accession="PANEL-ACC-1", study_date="20230505", slices=2)
    app = search(signed_in(clinician), accession=study.accession)
    assert not app.exception and not errors(app)
    [row] = app.session_state["pacs_results"][1]
    assert row["study_uid"] == study.study_uid and row["instances"] == 4
    app.selectbox(key="pacs_choice").set_value(study.study_uid).run()
    app.button(key="pacs_retrieve").click().run()
    assert not app.exception and not errors(app)
    with db.read_session() as session:
        [stored] = session.scalars(select(Study)).all()
        events = session.scalars(select(AuditEvent).where(AuditEvent.action.like("pacs:%"))).all()
    assert app.session_state["study_id"] == stored.id  # the retrieved study is the one open in the viewer
    assert any("Retrieved: 4 imported" in element.value for element in app.success)
    assert [e.action for e in events] == ["pacs:study:find", "pacs:study:retrieve"]
    trail = json.dumps([e.details for e in events])
    assert study.accession not in trail and study.study_uid not in trail


def test_a_bad_search_is_one_line_and_no_search(db, panel_env, pacs_server, clinician):
    app = search(signed_in(clinician), dates="2024-01-01")
    assert errors(app) == ["date: YYYYMMDD, or a range YYYYMMDD-YYYYMMDD (either end may be left open)"]
    assert not app.session_state["pacs_results"]


def test_the_panel_is_absent_without_a_pacs(db, app_env, clinician, monkeypatch):
    monkeypatch.delenv("MEDVQA_DICOMWEB_URL", raising=False)
    monkeypatch.delenv("MEDVQA_DIMSE_PACS", raising=False)
    app = signed_in(clinician).run()
    assert not app.exception
    assert "Find in PACS" not in [expander.label for expander in app.expander]
