"""Calibration end to end through the commands a hospital uses: `medvqa eval --predictions --plots` measures the
confidences, `medvqa calibrate` fits them on held-out questions and writes calibration.json beside the weights,
and answering (eval, ask) then applies it. A real (tiny, random) LLaVA and synthetic images: no data set needed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import select

from compliance.policy import Action
from medvqa.cli import main
from medvqa.db import AuditEvent
from medvqa.training.calibration import CALIBRATION_FILE, MIN_FIT
from tests import factories
from tests.model_factory import tiny_checkpoints, torch_single_thread  # noqa: F401 - pytest fixtures

QUESTIONS = MIN_FIT + 4  # per kind: enough to fit and to choose a threshold


@pytest.fixture
def model_copy(tiny_checkpoints, tmp_path):  # noqa: F811
    """A private copy of the tiny model: calibrate writes into the weights' folder."""
    return Path(shutil.copytree(tiny_checkpoints("llava"), tmp_path / "model"))


def _images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    paths = []
    for index in range(3):
        path = folder / f"synthetic-{index}.png"
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _rows(images: list[Path], answers: dict[str, str] | None = None) -> list[dict[str, str]]:
    rows = []
    for index in range(QUESTIONS):
        for kind, question in (("CLOSED", f"Is there a lesion number {index}?"), ("OPEN", f"Where is lesion {index}?")):
            qid = f"{kind[0].lower()}{index}"
            reference = (answers or {}).get(qid, "yes" if kind == "CLOSED" else "liver")
            rows.append(
                {
                    "qid": qid,
                    "image": str(images[index % len(images)]),
                    "question": question,
                    "answer": reference,
                    "answer_type": kind,
                    "question_type": "PRES" if kind == "CLOSED" else "POS",
                    "organ": "ABD",
                }
            )
    return rows


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run(*args, stdin=None):
    return CliRunner().invoke(main, [str(arg) for arg in args], input=stdin)


def test_measure_fit_and_apply_a_calibration(db, cli_env, model_copy, tmp_path):
    images = _images(tmp_path / "images")
    held_out = _write(tmp_path / "held-out.jsonl", _rows(images))
    predictions, plots = tmp_path / "out" / "predictions.jsonl", tmp_path / "out" / "plots"
    measured = run(
        "eval", "--data", held_out, "--model", model_copy, "--predictions", predictions, "--plots", plots, "--json"
    )
    assert measured.exit_code == 0, measured.output
    report = json.loads(measured.stdout)
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    # own, blind and shuffled: one line per question and condition, every field the issue names
    assert len(lines) == 3 * 2 * QUESTIONS == report["predictions"]["lines"]
    assert {line["condition"] for line in lines} == {"own", "blind", "shuffled"}
    fields = {
        "qid",
        "question",
        "reference",
        "answer",
        "correct",
        "confidence",
        "answer_type",
        "question_type",
        "organ",
    }
    assert fields <= set(lines[0])
    own = [line for line in lines if line["condition"] == "own"]
    assert all(line["confidence"] == line["raw_confidence"] for line in own)  # no calibration yet
    for kind in ("closed", "open"):
        figures = report["calibration"][kind]
        assert figures["n"] == QUESTIONS and 0 <= figures["ece"] <= 1 and 0 <= figures["aurc"] <= 1
        assert set(figures["selective_accuracy"]) == {"0.8", "0.5", "0.3"}
    assert "calibration" in report["blind"] and "calibration" in report["shuffled"]
    for path in report["plots"].values():
        assert Path(path).read_bytes()[:4] == b"\x89PNG"

    # Held-out references where the model is right half the time, so the fit has something to learn.
    said = {line["qid"]: line["answer"] for line in own}
    answers = {qid: text if index % 2 == 0 else "zzz" for index, (qid, text) in enumerate(sorted(said.items()))}
    held_out = _write(tmp_path / "held-out-2.jsonl", _rows(images, answers))

    clinician, engineer = factories.make_user(db, "clinician"), factories.make_user(db, "ml_engineer")
    refused = run(
        "calibrate",
        "--data",
        held_out,
        "--model",
        model_copy,
        "--user",
        clinician.name,
        stdin=factories.PASSWORD + "\n",
    )
    assert refused.exit_code == 1 and Action.MODEL_CALIBRATE.value in refused.stderr
    assert not (model_copy / CALIBRATION_FILE).exists()

    fitted = run(
        "calibrate",
        "--data",
        held_out,
        "--model",
        model_copy,
        "--user",
        engineer.name,
        "--json",
        stdin=factories.PASSWORD + "\n",
    )
    assert fitted.exit_code == 0, fitted.output
    outcome = json.loads(fitted.stdout[fitted.stdout.index("{") :])
    stored = json.loads((model_copy / CALIBRATION_FILE).read_text())
    assert stored["data"] == str(held_out) and stored["model_ref"] == report["model_ref"]
    assert {kind: entry["held_out"] for kind, entry in stored["kinds"].items()} == {
        "closed": QUESTIONS,
        "open": QUESTIONS,
    }
    with db.read_session() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == Action.MODEL_CALIBRATE.value)).all()
    assert [e.outcome for e in events] == ["denied", "success"]  # the clinician's attempt, then the engineer's fit
    event = events[1]
    assert event.details["sha256"] == outcome["sha256"] and event.actor_user_id == engineer.user_id

    applied = run(
        "eval", "--data", held_out, "--model", model_copy, "--no-blind", "--predictions", predictions, "--json"
    )
    assert applied.exit_code == 0, applied.output
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert any(row["confidence"] != row["raw_confidence"] for row in rows)  # calibrated now
    calibration = json.loads(applied.stdout)["calibration"]
    for kind in ("closed", "open"):
        threshold = stored["kinds"][kind]["threshold"]
        kept = [row for row in rows if row["answer_type"].lower() == kind and not row["abstained"]]
        if threshold is None:
            assert not kept  # no threshold reached the target: every answer abstains
        else:
            assert all(row["confidence"] >= threshold for row in kept)
        assert calibration[f"{kind}_abstention"]["abstained"] == QUESTIONS - len(kept)
    raw = run("eval", "--data", held_out, "--model", model_copy, "--no-blind", "--raw-confidence", "--json")
    figures = json.loads(raw.stdout)["calibration"]
    assert figures["closed_abstention"]["abstained"] == figures["open_abstention"]["abstained"] == 0


def test_calibrating_on_the_locked_test_set_is_refused(db, cli_env, model_copy, tmp_path, monkeypatch):
    images = _images(tmp_path / "images")
    locked = _write(tmp_path / "locked.jsonl", _rows(images))
    engineer = factories.make_user(db, "ml_engineer")
    monkeypatch.setenv("MEDVQA_LOCKED_TEST_SET", str(locked))
    same_file = run(
        "calibrate", "--data", locked, "--model", model_copy, "--user", engineer.name, stdin=factories.PASSWORD + "\n"
    )
    assert same_file.exit_code == 1 and "is the locked test set" in same_file.stderr
    assert same_file.stderr.count("\n") == 1
    copied = _write(tmp_path / "copy.jsonl", _rows(images)[:5])  # the same questions about the same images
    overlap = run(
        "calibrate", "--data", copied, "--model", model_copy, "--user", engineer.name, stdin=factories.PASSWORD + "\n"
    )
    assert overlap.exit_code == 1 and "asks 5 question(s) of the locked test set" in overlap.stderr
    assert not (model_copy / CALIBRATION_FILE).exists()
