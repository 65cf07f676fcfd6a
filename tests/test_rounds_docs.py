"""The round documents stay current with the code: every round setting is named with its default, the documents
exist, and the figures they quote are the code's."""

from __future__ import annotations

from pathlib import Path

import pytest

from medvqa.config import Settings
from medvqa.model.generation import GenerationSettings
from medvqa.training.compare import BOOTSTRAP_RESAMPLES

COMPLIANCE = Path(__file__).resolve().parents[1] / "compliance"
DOCUMENTS = ("intended_use.md", "model_card.md", "change_control_plan.md", "data_retention.md")
ROUND_SETTINGS = [name for name in Settings.model_fields if name.startswith("round_") or name == "locked_test_set"]


@pytest.mark.parametrize("name", DOCUMENTS)
def test_document_exists_and_has_a_title(name):
    text = (COMPLIANCE / name).read_text()
    assert text.startswith("# ") and len(text) > 1000


@pytest.mark.parametrize("setting", ROUND_SETTINGS)
def test_change_control_plan_names_every_round_setting(setting):
    plan = (COMPLIANCE / "change_control_plan.md").read_text()
    assert f"`{setting}`" in plan, f"describe {setting} in compliance/change_control_plan.md"


def test_gate_defaults_in_the_plan_are_the_code_defaults():
    plan = (COMPLIANCE / "change_control_plan.md").read_text()
    fields = Settings.model_fields
    for name in ("round_gate_max_overall_drop", "round_gate_max_subgroup_drop", "round_gate_min_subgroup_questions"):
        row = next(line for line in plan.splitlines() if f"`{name}`" in line and line.startswith("|"))
        assert row.split("|")[3].strip().startswith(str(fields[name].default)), row
    assert f"{BOOTSTRAP_RESAMPLES:,} resamples" in plan
    assert f"default {fields['round_min_examples'].default})" in plan


def test_intended_use_quotes_the_real_answer_length():
    text = (COMPLIANCE / "intended_use.md").read_text()
    assert f"at most {GenerationSettings().max_new_tokens} new tokens" in text
