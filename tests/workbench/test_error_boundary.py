"""No page of the workbench shows a traceback: an unexpected error is one line with an error id, the server log
carries the id with the traceback, Streamlit's own error details are off, and st.rerun/st.stop pass through."""

from __future__ import annotations

import logging
import os
import re

import pytest
from click.testing import CliRunner
from streamlit import config as streamlit_config
from streamlit.runtime.scriptrunner_utils.exceptions import RerunException, StopException

from medvqa.cli import main
from tests import factories
from tests import hostile_inputs as hostile
from tests.workbench.apptest import errors, on_page, signed_in
from workbench.error_boundary import run_guarded

SECRET = "Phisurname^Phigiven in /srv/medvqa/store/ab/cd/secret.dcm"


def test_a_page_that_raises_shows_one_line_with_an_error_id_and_logs_the_traceback(db, cli_env, monkeypatch, caplog):
    from medvqa.services import queries

    def broken(*args, **kwargs):
        raise RuntimeError(SECRET)

    monkeypatch.setattr(queries, "search_studies", broken)
    caplog.set_level(logging.ERROR, logger="medvqa.workbench")
    app = on_page(factories.make_user(db, "clinician"), "app_pages/ask.py")
    assert not app.exception  # Streamlit's own exception element (with its traceback) never appears
    [line] = [message for message in errors(app) if "error id" in message]
    error_id = re.search(r"error id ([0-9a-f]{8})", line).group(1)
    page = repr([element.proto for element in app.main]) + repr([element.proto for element in app.sidebar])
    assert "Phisurname" not in page and "secret.dcm" not in page and "Traceback" not in page
    [record] = [r for r in caplog.records if error_id in r.getMessage()]
    assert record.exc_info and record.exc_info[0] is RuntimeError  # the log has the whole traceback
    assert "Traceback" in caplog.text and SECRET in caplog.text


def test_the_app_turns_streamlit_error_details_off(db, cli_env):
    streamlit_config.set_option("client.showErrorDetails", "full")
    app = signed_in(factories.make_user(db, "clinician")).run()
    assert not app.exception
    assert streamlit_config.get_option("client.showErrorDetails") == "none"


def test_streamlit_control_flow_passes_through_the_boundary():
    for control in (StopException(), RerunException(None)):

        def page(control=control):
            raise control

        with pytest.raises(type(control)):
            run_guarded(page)


def test_the_workbench_command_sets_error_details_off(db, cli_env, monkeypatch):
    calls = []

    def fake_execve(path, argv, env):
        calls.append(env)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", fake_execve)
    monkeypatch.setenv("STREAMLIT_CLIENT_SHOW_ERROR_DETAILS", "full")
    assert CliRunner().invoke(main, ["workbench", "--no-browser"]).exit_code == 0
    assert calls[0]["STREAMLIT_CLIENT_SHOW_ERROR_DETAILS"] == "none"


def test_a_series_with_junk_numbers_opens_on_the_ask_page(db, cli_env, tmp_path):
    from medvqa.config import load_settings
    from medvqa.services.studies import import_paths

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "junk.dcm").write_bytes(hostile.junk_numbers(0))
    (folder / "ok.dcm").write_bytes(hostile.valid_dicom(1))
    report = import_paths(db, factories.OPERATOR, [folder], load_settings())
    assert report.count("imported") == 2
    app = on_page(factories.make_user(db, "clinician"), "app_pages/ask.py")
    assert not app.exception and not errors(app)
    assert app.get("image"), "the slice is shown"
