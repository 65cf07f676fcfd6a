"""Confidence figures (ECE, Brier, risk-coverage, selective accuracy), calibrators, abstention thresholds and the
calibration file: exact values on small cases, behaviour on synthetic data, and hostile files refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medvqa.errors import InvalidInput
from medvqa.services.confidence import CalibrationMismatch, calibration_for, judge, recalibrated
from medvqa.training.calibration import (
    CALIBRATION_FILE,
    MIN_FIT,
    Calibration,
    Calibrator,
    ConfidenceFigures,
    KindCalibration,
    LoadedCalibration,
    choose_threshold,
    expected_calibration_error,
    fit_kind,
    load_calibration,
    risk_coverage,
    selective_accuracy,
    write_plots,
)
from medvqa.training.data import VQAExample
from medvqa.training.metrics import Prediction, score

MODEL_REF = "tiny@0123456789ab"


def test_ece_over_equal_mass_bins_by_hand():
    # sorted: [0.6, 0.6 | 0.9, 0.9] -> |1.0 - 0.6| and |0.5 - 0.9|, each weighing half
    assert expected_calibration_error([0.9, 0.9, 0.6, 0.6], [True, False, True, True], bins=2) == pytest.approx(0.4)
    assert expected_calibration_error([0.5] * 10, [True, False] * 5) == pytest.approx(0.0)
    assert expected_calibration_error([1.0] * 4, [False] * 4) == pytest.approx(1.0)
    # ties share a bin, so the order of the file cannot change the figure
    ties = [0.3, 0.6, 0.6, 0.6]  # a cut by position alone would fall between the 0.6 answers
    first, last = [False, True, False, False], [False, False, False, True]
    assert expected_calibration_error(ties, first, bins=2) == pytest.approx(abs(0.25 - 0.525))
    assert expected_calibration_error(ties, last, bins=2) == pytest.approx(abs(0.25 - 0.525))


def test_risk_coverage_aurc_and_selective_accuracy_by_hand():
    confidences, correct = [0.9, 0.2, 0.8, 0.7], [True, False, False, True]
    coverage, risk = risk_coverage(confidences, correct)
    # most confident first: 0.9 right, 0.8 wrong, 0.7 right, 0.2 wrong
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == pytest.approx([0.0, 0.5, 1 / 3, 0.5])
    figures = ConfidenceFigures.measure(confidences, correct)
    assert figures is not None
    assert figures.aurc == pytest.approx((0.0 + 0.5 + 1 / 3 + 0.5) / 4)
    assert figures.brier == pytest.approx(((0.9 - 1) ** 2 + 0.2**2 + 0.8**2 + (0.7 - 1) ** 2) / 4)
    assert figures.accuracy == 0.5 and figures.mean_confidence == pytest.approx(0.65)
    assert selective_accuracy(confidences, correct, 0.25) == 1.0  # the most confident answer alone: right
    assert selective_accuracy(confidences, correct, 0.5) == 0.5  # the two most confident: one right
    # ceil(c x N) answers are kept: 0.8 -> 4, 0.5 -> 2, 0.3 -> 2
    assert figures.selective_accuracy == {"0.8": 0.5, "0.5": 0.5, "0.3": 0.5}


def test_missing_confidence_counts_as_zero_and_bad_values_are_refused():
    figures = ConfidenceFigures.measure([None, 1.0], [False, True])
    assert figures is not None and figures.ece == pytest.approx(0.0) and figures.brier == pytest.approx(0.0)
    assert ConfidenceFigures.measure([], []) is None
    for bad in ([1.5], [-0.1], [math.nan]):
        with pytest.raises(InvalidInput, match=r"outside 0\.\.1"):
            ConfidenceFigures.measure(bad, [True])
    with pytest.raises(InvalidInput, match="one per answer"):
        expected_calibration_error([0.5], [True, False])


def _overconfident(seed: int, n: int) -> tuple[list[float], list[bool]]:
    """Confidences in 0.5..1 whose real accuracy is far lower (like the shipped model's open answers)."""
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0.5, 1.0, n)
    correct = rng.uniform(0, 1, n) < (confidence - 0.35)
    return confidence.tolist(), correct.tolist()


def test_a_fitted_calibrator_lowers_the_error_on_fresh_answers_and_keeps_their_order():
    fit_conf, fit_correct = _overconfident(0, 400)
    entry = fit_kind(fit_conf, fit_correct, precision_target=0.5)
    assert entry.calibrator.method != "identity"
    assert entry.cross_validated_brier[entry.calibrator.method] < entry.cross_validated_brier["identity"]
    fresh_conf, fresh_correct = _overconfident(1, 2000)
    calibrated = entry.calibrator.apply(np.array(fresh_conf))
    raw_ece = expected_calibration_error(fresh_conf, fresh_correct)
    assert raw_ece > 0.25
    assert expected_calibration_error(calibrated.tolist(), fresh_correct) < raw_ece / 3
    order = np.argsort(fresh_conf, kind="stable")
    assert np.all(np.diff(calibrated[order]) >= -1e-12)  # monotone: calibration never reorders answers
    # the threshold, chosen out of fold, keeps answers right at about the target on fresh data
    assert entry.threshold is not None and entry.kept_precision is not None and entry.kept_precision >= 0.5
    kept = calibrated >= entry.threshold
    assert 0 < kept.sum() < len(kept)
    assert np.mean(np.array(fresh_correct)[kept]) >= 0.45


def test_each_method_round_trips_through_json():
    conf, correct = _overconfident(2, 200)
    hits = np.array(correct, dtype=float)
    from medvqa.training.calibration import _fit

    for method in ("identity", "temperature", "platt", "isotonic"):
        fitted = _fit(method, np.array(conf), hits)
        back = Calibrator.from_json(json.loads(json.dumps(fitted.to_json())))
        assert np.allclose(back.apply(np.array(conf)), fitted.apply(np.array(conf)))
        assert np.all((fitted.apply(np.array(conf)) >= 0) & (fitted.apply(np.array(conf)) <= 1))


def test_too_few_answers_keep_the_raw_confidence_and_never_abstain():
    entry = fit_kind([0.9] * (MIN_FIT - 1), [False] * (MIN_FIT - 1), precision_target=0.85)
    assert entry.calibrator.method == "identity" and entry.threshold is None
    calibration = _calibration(closed=entry, open_=entry)
    assert calibration.apply("closed", 0.9) == 0.9 and not calibration.abstains("closed", 0.9)


def test_an_unreachable_precision_target_means_always_abstain():
    conf, correct = _overconfident(3, 200)
    entry = fit_kind(conf, correct, precision_target=0.99)
    assert entry.threshold is None
    calibration = _calibration(closed=entry, open_=entry)
    assert calibration.abstains("open", 0.999) and calibration.abstains("open", None)


def test_a_threshold_never_splits_answers_of_equal_confidence():
    confidences = np.array([0.9] * 12 + [0.8] * 12)
    correct = np.array([1.0] * 12 + [1.0] * 6 + [0.0] * 6)
    threshold, kept, precision = choose_threshold(confidences, correct, target=0.8)
    # keeping every 0.8 answer gives 18/24 = 75% < 80%: the cut falls between the values, at 0.9
    assert (threshold, kept, precision) == (0.9, 0.5, 1.0)
    assert choose_threshold(confidences[:5], correct[:5], target=0.5) == (None, None, None)  # < MIN_KEPT answers


def _calibration(
    closed: KindCalibration | None = None,
    open_: KindCalibration | None = None,
    adapter_ref: str | None = None,
    model_ref: str = MODEL_REF,
) -> Calibration:
    default = KindCalibration(Calibrator("temperature", temperature=2.0), 0.6, 0.85, MIN_FIT)
    kinds = {"closed": closed or default, "open": open_ or default}
    return Calibration(kinds, model_ref, adapter_ref, "held-out.jsonl", "0" * 64, "2026-12-06T00:00:00+00:00")


def test_the_file_round_trips_and_names_its_weights(tmp_path):
    path, sha256 = _calibration().save(tmp_path)
    assert path == tmp_path / CALIBRATION_FILE and len(sha256) == 64
    loaded = load_calibration(tmp_path, model_ref="renamed-folder@0123456789ab", adapter_ref=None)
    assert loaded is not None and loaded.sha256 == sha256
    assert loaded.calibration.to_json() == _calibration().to_json()
    assert loaded.provenance() == {
        "file": CALIBRATION_FILE,
        "sha256": sha256,
        "methods": dict.fromkeys(("closed", "open"), "temperature"),
    }
    with pytest.raises(InvalidInput, match="fitted for model"):
        load_calibration(tmp_path, model_ref="tiny@ffffffffffff", adapter_ref=None)
    with pytest.raises(InvalidInput, match="fitted for adapter"):
        load_calibration(tmp_path, model_ref=MODEL_REF, adapter_ref="a" * 64)
    assert load_calibration(tmp_path / "nothing-here", model_ref=MODEL_REF, adapter_ref=None) is None


HOSTILE_EDITS = [
    ("not json", lambda d: "{"),
    ("format", lambda d: {**d, "format": 99}),
    ("kinds", lambda d: {**d, "kinds": {"closed": d["kinds"]["closed"]}}),
    ("temperature", lambda d: _set(d, "calibrator", {"method": "temperature", "temperature": -1})),
    ("temperature nan", lambda d: _set(d, "calibrator", {"method": "temperature", "temperature": "nan"})),
    ("platt reversing", lambda d: _set(d, "calibrator", {"method": "platt", "slope": -2, "intercept": 0})),
    ("isotonic falling", lambda d: _set(d, "calibrator", {"method": "isotonic", "knots": [[0, 0.9], [1, 0.1]]})),
    ("isotonic above 1", lambda d: _set(d, "calibrator", {"method": "isotonic", "knots": [[0, 0.1], [1, 7]]})),
    ("unknown method", lambda d: _set(d, "calibrator", {"method": "exec"})),
    ("threshold", lambda d: _set(d, "threshold", 3)),
    ("threshold type", lambda d: _set(d, "threshold", "low")),
    ("missing", lambda d: _set(d, "precision_target", None)),
]


def _set(data, key, value):
    data = json.loads(json.dumps(data))
    data["kinds"]["closed"][key] = value
    return data


@pytest.mark.parametrize(("name", "edit"), HOSTILE_EDITS, ids=[name for name, _ in HOSTILE_EDITS])
def test_a_malformed_or_hostile_file_is_refused_in_one_line(tmp_path, name, edit):
    _calibration().save(tmp_path)
    edited = edit(json.loads((tmp_path / CALIBRATION_FILE).read_text()))
    (tmp_path / CALIBRATION_FILE).write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(InvalidInput) as raised:
        load_calibration(tmp_path, model_ref=MODEL_REF, adapter_ref=None)
    assert "\n" not in str(raised.value)


@settings(max_examples=60, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.text(max_size=5),
        lambda c: st.lists(c) | st.dictionaries(st.text(max_size=5), c),
        max_leaves=20,
    )
)
def test_any_json_value_as_a_calibrator_is_refused_or_monotone(value):
    try:
        calibrator = Calibrator.from_json(value if isinstance(value, dict) else {"method": value})
    except InvalidInput:
        return
    out = calibrator.apply(np.linspace(0, 1, 11))
    assert np.all(np.diff(out) >= -1e-12) and np.all((out >= 0) & (out <= 1))


def test_a_recorded_calibration_that_changed_or_vanished_is_refused(tmp_path):
    _, sha256 = _calibration(adapter_ref="a" * 64).save(tmp_path)
    loaded = calibration_for(None, tmp_path, model_ref=MODEL_REF, adapter_ref="a" * 64, recorded_sha256=sha256)
    assert loaded is not None and loaded.sha256 == sha256
    edited = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    edited["kinds"]["closed"]["threshold"] = 0.0  # an insider who wants no abstention
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(edited))
    with pytest.raises(CalibrationMismatch, match="was recorded for these weights"):
        calibration_for(None, tmp_path, model_ref=MODEL_REF, adapter_ref="a" * 64, recorded_sha256=sha256)
    (tmp_path / CALIBRATION_FILE).unlink()
    with pytest.raises(CalibrationMismatch, match="is missing"):
        calibration_for(None, tmp_path, model_ref=MODEL_REF, adapter_ref="a" * 64, recorded_sha256=sha256)
    # the adapter's folder, not the model's, holds an adapter's calibration
    _calibration().save(tmp_path / "model")
    assert calibration_for(tmp_path / "model", tmp_path, model_ref=MODEL_REF, adapter_ref="a" * 64) is None
    assert calibration_for(tmp_path / "model", None, model_ref=MODEL_REF, adapter_ref=None) is not None


def _examples() -> list[VQAExample]:
    rows = [("Is there a mass?", "yes", "CLOSED"), ("Where is the mass?", "liver", "OPEN")] * 15
    return [
        VQAExample(str(i), Path(f"{i % 3}.png"), q, a, t, "PRES" if t == "CLOSED" else "POS", "ABD")
        for i, (q, a, t) in enumerate(rows)
    ]


def test_judging_and_recalibrating_a_report_change_confidences_not_scores(tmp_path):
    examples = _examples()
    predictions = [Prediction("yes" if i % 4 else "no", 0.9, 0.9) for i in range(len(examples))]
    raw = score(examples, predictions)
    never = KindCalibration(Calibrator("temperature", temperature=3.0), 0.0, 0.85, MIN_FIT)
    always = KindCalibration(Calibrator(), None, 0.85, MIN_FIT)
    path, sha256 = _calibration(closed=never, open_=always).save(tmp_path)
    loaded = LoadedCalibration(_calibration(closed=never, open_=always), path, sha256)
    judged = judge(loaded, "Is there a mass?", 0.9)
    assert judged.kind == "closed" and judged.raw_confidence == 0.9 and not judged.abstained
    assert judged.confidence == pytest.approx(1 / (1 + math.exp(-math.log(9) / 3)))
    assert judge(loaded, "Where is the mass?", 0.9).abstained
    assert judge(None, "Where is the mass?", 0.9) == judge(None, "Where is the mass?", 0.9)
    assert not judge(None, "Where is the mass?", 0.9).abstained
    report = recalibrated(raw, loaded)
    assert report.overall == raw.overall  # accuracy is the answers' text: calibration does not touch it
    figures = report.calibration()
    assert figures["open_abstention"] == {"coverage": 0.0, "accuracy": None, "abstained": 15}
    assert figures["closed_abstention"]["coverage"] == 1.0
    assert figures["closed"]["mean_confidence"] < raw.calibration()["closed"]["mean_confidence"]


def test_plots_are_written_as_png(tmp_path):
    conf, correct = _overconfident(4, 120)
    examples = _examples() * 4
    report = score(examples, [Prediction("yes" if ok else "x", c, c) for c, ok in zip(conf, correct, strict=True)])
    paths = write_plots(report.calibration(), tmp_path / "plots", title="test")
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
