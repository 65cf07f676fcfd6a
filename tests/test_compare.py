"""Paired comparison of two evaluations: McNemar, bootstrap intervals, per-subgroup deltas, the gate, outputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from medvqa.errors import InvalidInput
from medvqa.training.compare import (
    GateSettings,
    bootstrap_interval,
    compare_reports,
    comparison_markdown,
    decide_gate,
    mcnemar_exact,
    write_chart,
)
from medvqa.training.data import VQAExample
from medvqa.training.metrics import score

# (answer_type, question_type, organ, reference)
QUESTIONS = [("CLOSED", "PRES", "CHEST", "yes")] * 6 + [("CLOSED", "POS", "HEAD", "no")] * 4
QUESTIONS += [("OPEN", "POS", "HEAD", "left lung")] * 10


def _examples() -> list[VQAExample]:
    return [
        VQAExample(str(i), Path(f"{i}.png"), f"q{i}", ref, kind, qtype, organ)
        for i, (kind, qtype, organ, ref) in enumerate(QUESTIONS)
    ]


def _report(right: list[bool]):
    examples = _examples()
    return score(examples, [e.answer if ok else "wrong" for e, ok in zip(examples, right, strict=True)])


def test_mcnemar_matches_the_binomial_formula():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 2**5)  # 0.0625
    # b=8, c=2: 2 * P(X <= 2), X ~ Bin(10, 1/2)
    assert mcnemar_exact(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar_exact(3, 3) == 1.0


@given(st.integers(0, 40), st.integers(0, 40))
def test_mcnemar_is_symmetric_and_a_probability(b, c):
    p = mcnemar_exact(b, c)
    assert p == mcnemar_exact(c, b) and 0 < p <= 1


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    diffs = np.array([1.0] * 30 + [0.0] * 60 + [-1.0] * 10)
    first = bootstrap_interval(diffs, np.random.default_rng(7), 1000)
    assert first == bootstrap_interval(diffs, np.random.default_rng(7), 1000)
    assert first[0] < diffs.mean() < first[1] and first[0] > 0  # +0.2 with n=100 is clearly positive
    assert bootstrap_interval(np.zeros(20), np.random.default_rng(0), 200) == (0.0, 0.0)


def test_identical_reports_show_no_change_and_pass():
    report = _report([True, False] * 10)
    result = compare_reports(report, report, GateSettings())
    assert all(row.delta == 0 and row.ci_low == row.ci_high == 0 for row in result.rows)
    assert result.mcnemar.p_value == 1.0 and result.gate.passed


def test_deltas_per_subgroup_and_mcnemar_counts():
    live = _report([True] * 20)
    # candidate loses two PRES/CHEST closed questions and gains nothing
    candidate = _report([False, False] + [True] * 18)
    result = compare_reports(candidate, live, GateSettings(min_subgroup_questions=5))
    rows = {(r.group, r.subgroup): r for r in result.rows}
    assert rows[("overall", "all")].delta == pytest.approx(-0.1) and rows[("overall", "all")].n == 20
    assert rows[("question_type", "PRES")].delta == pytest.approx(-2 / 6)
    assert rows[("question_type", "POS")].delta == 0
    assert rows[("organ", "CHEST")].n == 6 and rows[("answer_type", "open")].delta == 0
    assert (result.mcnemar.n_closed, result.mcnemar.candidate_only, result.mcnemar.live_only) == (10, 0, 2)
    assert not result.gate.passed
    failed = " ".join(result.gate.reasons)
    assert "overall all" in failed and "PRES" in failed and "CHEST" in failed and "POS" not in failed
    assert result.rows[0].group == "overall"  # the table starts with the overall row


GATE_CASES = [  # (overall delta, subgroup delta, subgroup n, gate, passes)
    (0.0, -0.02, 20, GateSettings(), True),  # exactly the allowed 2 points
    (0.0, -0.03, 20, GateSettings(), False),
    (0.0, -0.30, 5, GateSettings(), True),  # too few questions to gate on
    (-0.01, 0.0, 20, GateSettings(), False),  # overall may not drop at all by default
    (-0.01, 0.0, 20, GateSettings(max_overall_drop=0.01), True),
]


@pytest.mark.parametrize(("overall", "sub", "n", "gate", "passes"), GATE_CASES)
def test_gate_rules(overall, sub, n, gate, passes):
    from medvqa.training.compare import Delta

    rows = [
        Delta("overall", "all", 100, 0.5, 0.5 + overall, overall, 0, 0),
        Delta("organ", "X", n, 0.5, 0.5 + sub, sub, 0, 0),
    ]
    assert decide_gate(rows, gate).passed is passes


def test_gate_settings_refuse_nonsense():
    with pytest.raises(ValueError):
        GateSettings(max_subgroup_drop=2)
    with pytest.raises(ValueError):
        GateSettings(min_subgroup_questions=0)


def test_reports_on_different_questions_are_refused():
    live = _report([True] * 20)
    other = score(_examples()[:5], ["yes"] * 5)
    with pytest.raises(InvalidInput, match="different questions"):
        compare_reports(other, live, GateSettings())


def test_markdown_table_and_png_chart(tmp_path):
    result = compare_reports(_report([True] * 20), _report([False] + [True] * 19), GateSettings())
    data = result.to_json()
    table = comparison_markdown(data, "Locked test set")
    assert table.splitlines()[2].startswith("| group | subgroup | n | live | candidate")
    assert "| overall | all | 20 | 95.0% | 100.0% | +5.0 |" in table
    assert "McNemar" in table and "Gate: PASSED" in table
    chart = write_chart(data, tmp_path / "chart.png")
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.height > 30 * len(data["rows"])
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert any(tuple(p) == (31, 119, 180) for p in pixels[::7])  # candidate bars were drawn
    assert math.isclose(data["rows"][0]["delta"], 0.05)
