"""`medvqa workbench` and `medvqa demo` start the app; the command and the app start without torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from compliance.policy import DEMO_PASSWORD
from medvqa.cli import main
from medvqa.services.users import add_user, set_active
from tests.factories import OPERATOR
from tests.test_demo import fake_vqa_rad
from workbench import SERVER_PATH


@pytest.fixture
def exec_calls(monkeypatch):
    """Capture the exec that would replace the process with Streamlit."""
    calls = []

    def fake_execve(path, argv, env):
        calls.append((path, argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", fake_execve)
    return calls


def test_workbench_execs_streamlit_and_keeps_streamlit_settings(db, cli_env, exec_calls, monkeypatch):
    monkeypatch.setenv("STREAMLIT_SERVER_PORT", "8599")
    result = CliRunner().invoke(main, ["workbench", "--no-browser"])
    assert result.exit_code == 0, result.output
    [(path, argv, env)] = exec_calls
    assert path == sys.executable and argv[1:] == ["-m", "streamlit", "run", str(SERVER_PATH)]
    assert env["STREAMLIT_SERVER_PORT"] == "8599" and env["STREAMLIT_SERVER_HEADLESS"] == "true"
    assert env["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] == "false"
    assert env["MEDVQA_DATABASE_URL"] == cli_env["MEDVQA_DATABASE_URL"]


def test_workbench_on_a_database_that_is_not_migrated_is_one_line(tmp_path, monkeypatch, exec_calls):
    monkeypatch.setenv("MEDVQA_HOME", str(tmp_path))
    monkeypatch.delenv("MEDVQA_DATABASE_URL", raising=False)
    result = CliRunner().invoke(main, ["workbench"])
    assert result.exit_code == 1 and "run `medvqa db upgrade`" in result.stderr and not exec_calls


def test_demo_sets_up_then_starts_the_app(tmp_path, monkeypatch, exec_calls):
    monkeypatch.setenv("MEDVQA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDVQA_DEMO_DATA", str(fake_vqa_rad(tmp_path / "vqa")))
    for name in ("MEDVQA_DATABASE_URL", "MEDVQA_AUDIT_ANCHOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("STREAMLIT_SERVER_ADDRESS", raising=False)
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 0 and "demo studies: 3 imported" in result.stdout
    assert exec_calls[0][2]["STREAMLIT_SERVER_ADDRESS"] == "127.0.0.1"
    assert "starting the workbench" in result.stdout and len(exec_calls) == 1
    assert exec_calls[0][1][-1] == str(SERVER_PATH)


def test_help_and_the_app_modules_do_not_import_torch():
    probe = (
        "import sys, importlib; from click.testing import CliRunner; from medvqa.cli import main;"
        "assert CliRunner().invoke(main, ['--help']).exit_code == 0;"
        "[importlib.import_module(m) for m in ('workbench.auth', 'workbench.resources', 'medvqa.services.ask',"
        " 'medvqa.services.review', 'medvqa.services.viewer', 'medvqa.services.audit_log')];"
        "print(sorted(m for m in ('torch', 'transformers', 'monai') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_lists_the_new_commands():
    text = CliRunner().invoke(main, ["--help"]).stdout
    assert all(name in text for name in ("workbench", "ask", "feedback", "demo"))


def test_workbench_listens_on_loopback_unless_an_address_is_configured(db, cli_env, exec_calls, monkeypatch):
    monkeypatch.delenv("STREAMLIT_SERVER_ADDRESS", raising=False)
    assert CliRunner().invoke(main, ["workbench", "--no-browser"]).exit_code == 0
    assert exec_calls[-1][2]["STREAMLIT_SERVER_ADDRESS"] == "127.0.0.1"
    monkeypatch.setenv("STREAMLIT_SERVER_ADDRESS", "10.0.0.5")  # configured: kept (no published password here)
    assert CliRunner().invoke(main, ["workbench", "--no-browser"]).exit_code == 0
    assert exec_calls[-1][2]["STREAMLIT_SERVER_ADDRESS"] == "10.0.0.5"


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "10.0.0.5", "medvqa.hospital.example"])
def test_workbench_refuses_another_address_while_an_account_has_the_demo_password(
    db, cli_env, exec_calls, monkeypatch, address
):
    add_user(db, OPERATOR, "dr.demo", DEMO_PASSWORD, "clinician")
    monkeypatch.setenv("STREAMLIT_SERVER_ADDRESS", address)
    result = CliRunner().invoke(main, ["workbench", "--no-browser"])
    assert result.exit_code == 1 and not exec_calls
    assert result.stderr.count("\n") == 1 and f"refusing to serve on {address}" in result.stderr
    assert "dr.demo" in result.stderr
    set_active(db, OPERATOR, "dr.demo", active=False)  # once no active account has it, the address is served
    assert CliRunner().invoke(main, ["workbench", "--no-browser"]).exit_code == 0


@pytest.mark.parametrize("address", ["0.0.0.0", "192.168.1.10"])
def test_demo_refuses_a_non_loopback_address_before_setting_anything_up(tmp_path, monkeypatch, exec_calls, address):
    monkeypatch.setenv("MEDVQA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDVQA_DEMO_DATA", str(fake_vqa_rad(tmp_path / "vqa")))
    monkeypatch.setenv("STREAMLIT_SERVER_ADDRESS", address)
    for name in ("MEDVQA_DATABASE_URL", "MEDVQA_AUDIT_ANCHOR"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 1 and not exec_calls and "listens on 127.0.0.1 only" in result.stderr
    assert not (tmp_path / "home" / "medvqa.db").exists()
