"""`medvqa rounds run|list|compare|promote|rollback|reproduce`, invoked on the group itself with click's CliRunner."""

# ruff: noqa: F811 - fixtures imported from tests/ helpers are test parameters by design

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from medvqa.cli.rounds import rounds
from medvqa.config import load_settings
from medvqa.services.ask import live_adapter_id
from tests import factories
from tests.model_factory import tiny_checkpoints, torch_single_thread  # noqa: F401 - pytest fixtures
from tests.round_factory import (
    cheap_passwords,  # noqa: F401 - pytest fixture
    import_image,
    record_model_answer,
    review,
    write_locked_test_set,
    write_png,
)

QUICK = ["--max-steps", "2", "--batch-size", "2", "--rank", "2"]


@pytest.fixture
def cli_round_env(db, cli_env, tmp_path, tiny_checkpoints, cheap_passwords, monkeypatch):
    pngs = [write_png(tmp_path / f"img{i}.png", i) for i in range(5)]
    extra = {
        "MEDVQA_BASE_MODEL": str(tiny_checkpoints("llava")),
        "MEDVQA_DEVICE": "cpu",
        "MEDVQA_LOCKED_TEST_SET": str(write_locked_test_set(tmp_path / "locked.jsonl", pngs[3:])),
        "MEDVQA_ROUND_MIN_EXAMPLES": "3",
        "MEDVQA_ROUND_GATE_MAX_OVERALL_DROP": "1",
        "MEDVQA_ROUND_GATE_MAX_SUBGROUP_DROP": "1",
    }
    for key, value in extra.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    clinician, reviewer = factories.make_user(db, "clinician"), factories.make_user(db, "reviewer")
    for png in pngs[:3]:
        answer_id = record_model_answer(db, settings, clinician, import_image(db, settings, png), "Is it normal?", "no")
        review(db, reviewer, answer_id, "incorrect", "yes")
    return factories.make_user(db, "ml_engineer"), factories.make_user(db, "admin")


def _invoke(*args: str, user: str | None = None):
    command = [*args, *(["--user", user] if user else [])]
    return CliRunner().invoke(rounds, command, input=f"{factories.PASSWORD}\n" if user else None)


def test_run_list_compare_promote_rollback_reproduce(db, cli_round_env, tmp_path):
    engineer, admin = cli_round_env
    ran = _invoke("run", *QUICK, "--json", user=engineer.name)
    assert ran.exit_code == 0, ran.output
    outcome = json.loads(ran.stdout)
    assert outcome["gate_passed"] and len(outcome["adapter_sha256"]) == 64

    listed = json.loads(_invoke("list", "--json").stdout)["rounds"]
    assert [r["id"] for r in listed] == [outcome["round_id"]] and listed[0]["dataset"]["items"] == 3
    assert f"adapter {outcome['adapter_id']} (candidate)" in _invoke("list").stdout

    compared = _invoke("compare", str(outcome["round_id"]), "--out", str(tmp_path / "reports"))
    assert compared.exit_code == 0, compared.output
    assert "| group | subgroup | n | live | candidate | delta (points) | 95% CI (points) |" in compared.stdout
    chart = tmp_path / "reports" / f"round-{outcome['round_id']}.png"
    assert chart.read_bytes().startswith(b"\x89PNG") and f"chart: {chart}" in compared.stdout

    adapter = str(outcome["adapter_id"])
    early = _invoke("promote", adapter, user=admin.name)  # nothing requested yet
    assert early.exit_code == 1 and early.stderr.startswith("medvqa: error: ") and "Traceback" not in early.output
    assert _invoke("promote", adapter, "--reason", "gate passed", user=engineer.name).exit_code == 0
    approved = _invoke("promote", adapter, user=admin.name)
    assert approved.exit_code == 0 and "is live" in approved.stdout
    assert live_adapter_id(db) == outcome["adapter_id"]
    rolled = _invoke("rollback", "--reason", "reports of wrong answers", user=admin.name)
    assert rolled.exit_code == 0 and "base model" in rolled.stdout and live_adapter_id(db) is None

    again = _invoke("reproduce", str(outcome["round_id"]), "--json", user=engineer.name)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["same_adapter"]


def test_errors_are_one_line(cli_round_env, monkeypatch):
    engineer, _ = cli_round_env
    monkeypatch.delenv("MEDVQA_LOCKED_TEST_SET")
    result = _invoke("run", *QUICK, user=engineer.name)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("medvqa: error: no locked test set: set MEDVQA_LOCKED_TEST_SET")
    missing = _invoke("compare", "999")
    assert missing.exit_code == 1 and missing.stderr == "medvqa: error: round 999 does not exist\n"
    wrong = CliRunner().invoke(rounds, ["run", "--user", engineer.name], input="not the password\n")
    assert wrong.exit_code == 1 and "Traceback" not in wrong.output
