"""The `medvqa` command contract: readable help, one-line errors without tracebacks, --json, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from medvqa.cli import DEMO_USERS, main
from medvqa.db.engine import Database
from medvqa.services.users import authenticate
from tests.factories import PASSWORD

MEDVQA = shutil.which("medvqa", path=str(Path(sys.executable).parent)) or "medvqa"


def run(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


@pytest.mark.parametrize(
    "args", [[], ["db"], ["users"], ["audit"], ["users", "add"], ["audit", "verify"], ["db", "upgrade"]]
)
def test_help_reads_well(args):
    result = run(*args, "--help")
    assert result.exit_code == 0 and result.stdout.startswith("Usage: medvqa")
    assert "Error" not in result.stdout


def test_users_add_takes_the_password_from_stdin_never_argv(db, cli_env):
    result = run("users", "add", "dr.house", "--role", "clinician", "--json", input=PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["role"] == "clinician"
    assert authenticate(db, "dr.house", PASSWORD).role == "clinician"
    assert run("users", "add", "x", "--role", "admin", "--password", PASSWORD).exit_code == 2  # no such option


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["users", "add", "dr.house", "--role", "surgeon"], PASSWORD, "role 'surgeon' does not exist"),
        (["users", "add", "dr.house", "--role", "clinician"], "", "no password on standard input"),
        (["users", "add", "dr.house", "--role", "clinician"], "short", "at least 12 characters"),
    ],
)
def test_bad_input_is_one_clear_line(db, cli_env, args, stdin, message):
    result = run(*args, input=stdin + "\n" if stdin else "")
    assert result.exit_code == 1
    assert result.stderr == f"medvqa: error: {result.stderr.removeprefix('medvqa: error: ')}"
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_wrong_configuration_names_the_variable(monkeypatch):
    monkeypatch.setenv("MEDVQA_DATABASE_URL", "oracle://h/d")
    result = run("users", "list")
    assert result.exit_code == 1
    assert result.stderr.startswith("medvqa: error: MEDVQA_DATABASE_URL: backend 'oracle' is not supported")


def test_unmigrated_database_says_how_to_fix_it(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDVQA_HOME", str(tmp_path))
    monkeypatch.delenv("MEDVQA_DATABASE_URL", raising=False)
    result = run("audit", "verify")
    assert result.exit_code == 1 and "run `medvqa db upgrade`" in result.stderr


def test_upgrade_is_idempotent(db, cli_env):
    result = run("db", "upgrade", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["from"] == json.loads(result.stdout)["to"]


def test_demo_sets_up_the_embedded_default_and_can_run_twice(monkeypatch, tmp_path):
    from tests.test_demo import fake_vqa_rad

    monkeypatch.setenv("MEDVQA_HOME", str(tmp_path / "home"))
    # Three teaching images stand in for the 315 (the browser test imports real ones): each
    # real one costs about a second of OCR on this machine, and this test is about the setup, not the images.
    monkeypatch.setenv("MEDVQA_DEMO_DATA", str(fake_vqa_rad(tmp_path / "vqa")))
    for name in ("MEDVQA_DATABASE_URL", "MEDVQA_AUDIT_ANCHOR"):
        monkeypatch.delenv(name, raising=False)
    for _ in range(2):
        result = run("demo", "--no-app")
        assert result.exit_code == 0, result.output
    listing = json.loads(run("users", "list", "--json").stdout)["users"]
    assert {u["username"]: u["role"] for u in listing} == DEMO_USERS
    assert (tmp_path / "home" / "medvqa.db").exists() and (tmp_path / "home" / "audit-anchor.log").exists()
    assert run("audit", "verify").exit_code == 0


def test_installed_command_unreachable_database_is_one_line(tmp_path):
    env = {**os.environ, "MEDVQA_HOME": str(tmp_path), "MEDVQA_DATABASE_URL": "postgresql://127.0.0.1:9/none"}
    result = subprocess.run([MEDVQA, "users", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("medvqa: error: cannot use the database:")
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_installed_command_reads_password_from_a_pipe(db: Database, cli_env):
    result = subprocess.run(
        [MEDVQA, "users", "add", "rev.one", "--role", "reviewer"],
        input=PASSWORD + "\n",
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert authenticate(db, "rev.one", PASSWORD).role == "reviewer"
