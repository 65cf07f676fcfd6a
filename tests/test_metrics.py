"""Metrics: answer normalisation, token F1/recall, and EvalReport figures checked against hand-computed values."""

from __future__ import annotations

import json
import math
from dataclasses import astuple, replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medvqa.errors import InvalidInput
from medvqa.training.data import VQAExample
from medvqa.training.metrics import (
    METRIC_KEYS,
    EvalReport,
    GroupScores,
    normalize_answer,
    score,
    token_f1,
    token_recall,
    tokens,
)

CASES = [
    ("Yes", "yes"),
    ("  NO.  ", "no"),
    ("x-ray", "x ray"),
    ("X ray", "x ray"),
    ("T2-weighted", "t2 weighted"),
    ("MRI - T2 weighted", "mri t2 weighted"),
    ("pulmonary/lymphatic", "pulmonary lymphatic"),
    ("coronal plane?", "coronal plane"),
    ("On the patient's left", "on patients left"),
    ("The   liver", "liver"),
    ("an abscess", "abscess"),
    ("Supine (see air-fluid level)", "supine see air fluid level"),
    ("Skull \tcartilage and medulla", "skull cartilage and medulla"),
    ("3.4 cm", "3.4 cm"),
    ("3.4.", "3.4"),
    (".5 cm", "0.5 cm"),
    ("2.5cm x 1.7cm", "2.5cm x 1.7cm"),
    ("1,000", "1000"),
    ("1,2", "1 2"),
    ("One", "1"),
    ("two lesions", "2 lesions"),
    ("none", "none"),
    ("café", "café"),
    ("\uff2d\uff32\uff29", "mri"),  # full-width letters fold under NFKC
    ("patient\u2019s", "patients"),  # typographic apostrophe
    ("", ""),
    ("?!", ""),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_tokens_split_normalised_words() -> None:
    assert tokens("The right lower-lobe.") == ["right", "lower", "lobe"]


F1_CASES = [
    # prediction, reference, F1, recall
    ("right lower lobe", "Right lower lobe.", 1.0, 1.0),
    ("the lower lobe", "right lower lobe", 0.8, 2 / 3),  # P = 2/2, R = 2/3, F1 = 2PR/(P+R) = 0.8
    ("right lower lobe of lung", "lower lobe", 4 / 7, 1.0),  # P = 2/5, R = 1, F1 = 0.8/1.4
    ("ct", "mri", 0.0, 0.0),
    ("", "mri", 0.0, 0.0),
    ("lobe lobe", "lobe", 2 / 3, 1.0),  # shared count is min(2, 1) = 1: P = 1/2, R = 1
    ("", "", 1.0, 1.0),
]


@pytest.mark.parametrize(("prediction", "reference", "f1", "recall"), F1_CASES)
def test_token_f1_and_recall(prediction: str, reference: str, f1: float, recall: float) -> None:
    assert token_f1(prediction, reference) == pytest.approx(f1)
    assert token_recall(prediction, reference) == pytest.approx(recall)


def example(qid: str, answer: str, answer_type: str, question_type: str, organ: str) -> VQAExample:
    return VQAExample(qid, Path(f"/img/{qid}.jpg"), f"question {qid}?", answer, answer_type, question_type, organ)  # type: ignore[arg-type]


# 4 closed + 3 open questions with known predictions; every expected figure below is worked out by hand.
HAND = [
    (example("c1", "yes", "CLOSED", "PRES", "CHEST"), "Yes."),  # right
    (example("c2", "no", "CLOSED", "PRES", "HEAD"), "yes"),  # wrong
    (example("c3", "no", "CLOSED", "POS", "HEAD"), ""),  # unanswered: wrong, still counted
    (example("c4", "left", "CLOSED", "POS", "ABD"), "Left"),  # right
    (example("o1", "x-ray", "OPEN", "MODALITY", "CHEST"), "X ray"),  # EM, F1 1, recall 1
    (example("o2", "right lower lobe", "OPEN", "POS", "CHEST"), "the lower lobe"),  # F1 0.8, recall 2/3
    (example("o3", "ct", "OPEN", "MODALITY", "HEAD"), "mri"),  # 0, 0, 0
]


@pytest.fixture
def hand_report() -> EvalReport:
    return score([e for e, _ in HAND], [p for _, p in HAND])


def test_hand_computed_overall(hand_report: EvalReport) -> None:
    assert hand_report.closed_accuracy == pytest.approx(2 / 4)
    assert hand_report.open_exact_match == pytest.approx(1 / 3)
    assert hand_report.open_token_f1 == pytest.approx((1 + 0.8 + 0) / 3)
    assert hand_report.open_recall == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert hand_report.overall_accuracy == pytest.approx(3 / 7)
    assert (hand_report.overall.n_closed, hand_report.overall.n_open, hand_report.overall.n) == (4, 3, 7)


def row(group: GroupScores) -> tuple[object, ...]:
    """(n_closed, n_open, closed acc, open EM, open F1, open recall, overall) of one group."""
    return astuple(group)


def test_hand_computed_breakdowns(hand_report: EvalReport) -> None:
    types = hand_report.by_question_type
    assert list(types) == ["POS", "MODALITY", "PRES"]  # largest group first, ties by name
    assert row(types["PRES"]) == (2, 0, 0.5, None, None, None, 0.5)
    assert row(types["POS"]) == pytest.approx((2, 1, 0.5, 0.0, 0.8, 2 / 3, 1 / 3))  # c3 wrong, c4 right, o2
    assert row(types["MODALITY"]) == (0, 2, None, 0.5, 0.5, 0.5, 0.5)  # o1 right, o3 wrong
    organs = hand_report.by_organ
    assert list(organs) == ["CHEST", "HEAD", "ABD"]
    assert row(organs["CHEST"]) == pytest.approx((1, 2, 1.0, 0.5, (1 + 0.8) / 2, (1 + 2 / 3) / 2, 2 / 3))
    assert row(organs["HEAD"]) == (2, 1, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert row(organs["ABD"]) == (1, 0, 1.0, None, None, None, 1.0)


def test_unanswered_closed_questions_count_as_wrong() -> None:
    closed = [example(str(i), "yes", "CLOSED", "PRES", "CHEST") for i in range(4)]
    report = score(closed, ["yes", "", "   ", "yes"])
    assert report.closed_accuracy == 0.5
    assert report.overall.n_closed == 4


def test_per_example_scores_are_kept(hand_report: EvalReport) -> None:
    o2 = hand_report.examples[5]
    assert (o2.qid, o2.exact_match, o2.prediction, o2.reference) == ("o2", False, "the lower lobe", "right lower lobe")
    assert o2.token_f1 == pytest.approx(0.8)


TOP_KEYS = {*METRIC_KEYS, "counts", "by_question_type", "by_organ"}


def test_json_keys_exactly(hand_report: EvalReport) -> None:
    data = hand_report.to_json()
    assert set(data) == TOP_KEYS
    assert set(METRIC_KEYS) == {
        "closed_accuracy",
        "open_exact_match",
        "open_token_f1",
        "open_recall",
        "overall_accuracy",
    }
    assert data["counts"] == {"n_closed": 4, "n_open": 3, "n": 7}
    assert data["by_organ"]["ABD"] == {
        "closed_accuracy": 1.0,
        "open_exact_match": None,
        "open_token_f1": None,
        "open_recall": None,
        "overall_accuracy": 1.0,
        "counts": {"n_closed": 1, "n_open": 0, "n": 1},
    }
    assert json.loads(json.dumps(data)) == data


def test_json_with_provenance_and_blind(hand_report: EvalReport) -> None:
    blind = score([e for e, _ in HAND], ["no", "no", "yes", "yes", "", "", ""])  # closed: only c2 right -> 0.25
    report = replace(hand_report, blind=blind).with_provenance(model_ref="m", data="test.jsonl")
    data = report.to_json()
    assert set(data) == TOP_KEYS | {"blind", "closed_accuracy_gain_over_blind", "model_ref", "data"}
    assert set(data["blind"]) == TOP_KEYS
    assert data["blind"]["closed_accuracy"] == 0.25
    assert data["closed_accuracy_gain_over_blind"] == 0.25  # 0.5 with images - 0.25 blind
    assert (data["model_ref"], data["data"]) == ("m", "test.jsonl")


def test_json_and_markdown_with_the_shuffled_baseline(hand_report: EvalReport) -> None:
    shuffled = score([e for e, _ in HAND], ["yes", "no", "no", "no", "", "", ""])  # closed: c1, c2, c3 right -> 0.75
    report = replace(hand_report, shuffled=shuffled)
    data = report.to_json()
    assert set(data) == TOP_KEYS | {"shuffled", "closed_accuracy_gain_over_shuffled"}
    assert data["shuffled"]["closed_accuracy"] == 0.75
    assert data["closed_accuracy_gain_over_shuffled"] == -0.25  # 0.5 with each question's own image
    text = report.to_markdown()
    assert "| shuffled baseline (other images of the set) |" in text
    assert "Closed accuracy gain over shuffled: -25.0 points" in text
    assert "blind" not in text


def test_markdown_shows_percentages(hand_report: EvalReport) -> None:
    text = hand_report.with_provenance(model_ref="smolvlm", adapter_ref="a1").to_markdown()
    assert "model_ref: `smolvlm`, adapter_ref: `a1`" in text
    assert "| overall | 7 | 4 | 3 | 50.0% | 33.3% | 60.0% | 55.6% | 42.9% |" in text
    assert "| PRES | 2 | 2 | 0 | 50.0% | n/a | n/a | n/a | 50.0% |" in text
    assert "| CHEST | 3 | 1 | 2 | 100.0% | 50.0% | 90.0% | 83.3% | 66.7% |" in text
    assert text.index("question type") < text.index("| PRES") < text.index("organ") < text.index("| CHEST")


def test_lengths_must_match() -> None:
    with pytest.raises(InvalidInput, match="2 predictions for 1 examples"):
        score([HAND[0][0]], ["yes", "no"])
    with pytest.raises(InvalidInput, match="empty"):
        score([], [])
    with pytest.raises(InvalidInput, match="prediction 0 is NoneType"):
        score([HAND[0][0]], [None])  # type: ignore[list-item]


WORDS = ["yes", "no", "left", "right lung", "x-ray", "ct", "the liver", "2 cm"]
rows = st.tuples(
    st.sampled_from(["CLOSED", "OPEN"]),
    st.sampled_from(["PRES", "POS", "ABN", "SIZE"]),
    st.sampled_from(["HEAD", "CHEST", "ABD"]),
    st.sampled_from(WORDS),
    st.one_of(st.sampled_from(WORDS), st.just(""), st.text(max_size=12)),
)


def build(data: list[tuple[str, str, str, str, str]]) -> tuple[list[VQAExample], list[str]]:
    examples = [example(str(i), answer, kind, qt, organ) for i, (kind, qt, organ, answer, _) in enumerate(data)]
    return examples, [row[4] for row in data]


def weighted(groups: dict[str, GroupScores], key: str, weight: str) -> float:
    """Average of one figure over groups, each weighted by its own denominator (groups without one skipped)."""
    parts: list[tuple[float, int]] = [
        (getattr(g, key), getattr(g, weight)) for g in groups.values() if getattr(g, weight)
    ]
    return sum(value * n for value, n in parts) / sum(n for _, n in parts)


@settings(max_examples=150, deadline=None)
@given(st.lists(rows, min_size=1, max_size=30))
def test_breakdowns_add_up_to_totals(data: list[tuple[str, str, str, str, str]]) -> None:
    report = score(*build(data))
    for groups in (dict(report.by_question_type), dict(report.by_organ)):
        assert sum(g.n for g in groups.values()) == report.overall.n == len(data)
        assert sum(g.n_closed for g in groups.values()) == report.overall.n_closed
        assert math.isclose(weighted(groups, "overall_accuracy", "n"), report.overall_accuracy or 0.0)
        if report.overall.n_closed:
            assert math.isclose(weighted(groups, "closed_accuracy", "n_closed"), report.closed_accuracy or 0.0)
        if report.overall.n_open:
            assert math.isclose(weighted(groups, "open_token_f1", "n_open"), report.open_token_f1 or 0.0)


@settings(max_examples=100, deadline=None)
@given(st.lists(rows, min_size=1, max_size=30))
def test_perfect_predictions_score_one_everywhere(data: list[tuple[str, str, str, str, str]]) -> None:
    examples, _ = build(data)
    report = score(examples, [e.answer for e in examples])
    groups = [report.overall, *report.by_question_type.values(), *report.by_organ.values()]
    figures = [getattr(g, key) for g in groups for key in METRIC_KEYS]
    assert all(value == 1.0 for value in figures if value is not None)
    assert report.closed_accuracy is not None or report.open_exact_match is not None


@given(st.text(max_size=40), st.text(max_size=40))
def test_f1_and_recall_bounded_and_consistent(prediction: str, reference: str) -> None:
    f1, recall = token_f1(prediction, reference), token_recall(prediction, reference)
    assert 0.0 <= f1 <= 1.0 and 0.0 <= recall <= 1.0
    assert f1 == pytest.approx(token_f1(reference, prediction))
    if normalize_answer(prediction) == normalize_answer(reference):
        assert f1 == recall == 1.0


@given(st.text(max_size=40))
def test_normalize_is_idempotent(text: str) -> None:
    once = normalize_answer(text)
    assert normalize_answer(once) == once
