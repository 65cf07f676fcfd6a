"""Modality and plane questions moved between training images, answered by the images' stage-0 labels."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from medvqa.training.attribute_questions import ANSWERS, attribute_questions, main
from medvqa.training.data import VQAExample, load_vqa_jsonl
from medvqa.training.default_recipe import RecipeSettings
from medvqa.training.metrics import normalize_answer
from medvqa.training.vision_pretrain import named_classes
from tests.test_vision_pretrain import vqa_row


def _row(image: str, question: str, answer: str, question_type: str = "MODALITY") -> VQAExample:
    return vqa_row(image, question, answer, question_type=question_type)


TRAIN = [
    _row("mri1", "What imaging modality was used?", "MRI"),
    _row("mri1", "Is this a CT of the abdomen?", "no"),  # asks about more than the modality: never moved
    _row("mri1", "What type of MRI sequence is this?", "T2 weighted"),  # answer is not a modality's name
    _row("ct1", "Is this a CT scan?", "yes"),
    _row("ct1", "Is this image a CT or MRI image?", "CT"),
    _row("mri2", "Is this an MRI?", "yes"),
    _row("xr1", "What kind of scan is this?", "X-ray"),
    _row("ax1", "What plane is this image in?", "Axial", "PLANE"),
    _row("ax1", "Is this a coronal plane?", "no", "PLANE"),
    _row("cor1", "Is this a coronal plane?", "yes", "PLANE"),
    _row("pa1", "Is this a PA film?", "yes", "PLANE"),  # frontal: PA or AP, labels cannot say which
]
LABELS = {
    "mri1": {"modality": "mri"},
    "ct1": {"modality": "ct"},
    "mri2": {"modality": "mri"},
    "xr1": {"modality": "xray"},
    "ax1": {"plane": "axial"},
    "cor1": {"plane": "coronal"},
    "pa1": {"plane": "frontal", "modality": "xray"},
}


VQA_RAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad"
LEVEL_1_ROWS = "44935acb5ca12b79"  # attribute_questions(train.jsonl): the e7bad39 package was trained on these
SHIPPED_ROWS = "b76007a5855cb1f1"  # attribute_questions(train.jsonl, every_class=True): the shipped weights


def _digest(rows: list[VQAExample]) -> str:
    """A fingerprint of moved rows that does not depend on where the images are stored."""
    text = "\n".join(f"{r.qid}|{r.image_path.name}|{r.question}|{r.answer}|{r.answer_type}" for r in rows)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _attribute(row: VQAExample) -> str:
    return row.question_type.lower()


@pytest.mark.parametrize("every_class", [False, True])
def test_every_moved_question_is_answered_by_its_images_label(every_class: bool):
    moved = attribute_questions([*TRAIN, _row("xr1", "Is this an X-ray?", "yes")], every_class=every_class)
    assert moved, "the toy training set has movable questions"
    for row in moved:
        label = LABELS[row.image_path.stem][_attribute(row)]
        named = named_classes(_attribute(row), row.question)
        answer = normalize_answer(row.answer)
        if answer in ("yes", "no"):
            assert len(named) == 1 and (answer == "yes") == (named == {label}), row
            assert row.answer_type == "CLOSED"
        else:
            assert answer == normalize_answer(ANSWERS[_attribute(row)][label]), row
            assert not named or label in named, row  # an open question, or an A-or-B naming the label
            assert row.answer_type == "OPEN"


def test_only_questions_about_the_attribute_alone_are_moved():
    questions = {row.question for row in attribute_questions(TRAIN)}
    assert "Is this a CT of the abdomen?" not in questions
    assert "What type of MRI sequence is this?" not in questions
    assert "Is this a PA film?" not in questions
    # The CT image is now asked the MRI image's open question and the A-or-B one, and answered from its label.
    ct_rows = {(row.question, row.answer) for row in attribute_questions(TRAIN) if row.image_path.stem == "ct1"}
    assert ("Is this image a CT or MRI image?", "CT") in ct_rows
    assert ("Is this an MRI?", "no") in ct_rows
    assert any(answer == "CT" and "CT" not in question for question, answer in ct_rows)


def test_a_frontal_radiograph_is_only_asked_no_about_its_plane():
    plane_rows = [
        row for row in attribute_questions(TRAIN) if row.image_path.stem == "pa1" and row.question_type == "PLANE"
    ]
    assert plane_rows and all(normalize_answer(row.answer) == "no" for row in plane_rows)


def test_moving_is_deterministic_per_seed_and_every_row_is_marked():
    first, again = attribute_questions(TRAIN, seed=3), attribute_questions(TRAIN, seed=3)
    assert first == again
    qids = [row.qid for row in first]
    assert len(set(qids)) == len(qids) and all(qid.startswith("moved-") for qid in qids)
    assert {row.qid for row in TRAIN}.isdisjoint(qids)


def test_no_known_label_moves_nothing():
    assert attribute_questions([_row("a", "Is there a mass?", "yes", "PRES")]) == []


def test_every_class_asks_about_each_other_class_and_balances_with_yes():
    train = [*TRAIN, _row("xr1", "Is this an X-ray?", "yes")]  # three modality classes with a yes/no wording
    plain, every = attribute_questions(train, seed=1), attribute_questions(train, seed=1, every_class=True)

    def closed(rows: list[VQAExample], image: str) -> list[tuple[frozenset[str], str]]:
        found = [(row, normalize_answer(row.answer)) for row in rows if row.image_path.stem == image]
        return [(frozenset(named_classes("modality", r.question)), a) for r, a in found if a in ("yes", "no")]

    for image, label in (("ct1", "ct"), ("mri2", "mri"), ("xr1", "xray")):
        rows = closed(every, image)
        assert {named for named, answer in rows if answer == "no"} == {
            frozenset([c]) for c in {"ct", "mri", "xray"} - {label}
        }
        assert all(named == {label} for named, answer in rows if answer == "yes")
        assert sum(answer == "yes" for _, answer in rows) == sum(answer == "no" for _, answer in rows) == 2
        assert len(closed(plain, image)) == 2  # one yes, one no


@pytest.mark.skipif(not VQA_RAD.is_dir(), reason="the shared VQA-RAD copy is not present")
def test_on_vqa_rad_the_level_1_rows_are_kept_and_every_class_adds_closed_ones():
    train = load_vqa_jsonl(VQA_RAD / "train.jsonl")
    level_1, every = attribute_questions(train), attribute_questions(train, every_class=True)
    assert (len(level_1), _digest(level_1)) == (457, LEVEL_1_ROWS)  # what the previous package was trained on
    assert (len(every), _digest(every)) == (769, SHIPPED_ROWS)  # what the shipped weights were trained on
    assert Counter(r.answer_type for r in every) - Counter(r.answer_type for r in level_1) == {"CLOSED": 312}


def test_the_recipe_switch_is_zero_one_or_two():
    assert RecipeSettings().attribute_questions == 2  # the shipped weights' recipe
    assert RecipeSettings(attribute_questions=1).attribute_questions == 1
    with pytest.raises(ValueError, match="attribute_questions must be 0, 1 or 2"):
        RecipeSettings(attribute_questions=3)


def test_the_command_writes_the_moved_rows_as_a_file_eval_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    for name in {row.image_path.stem for row in TRAIN}:
        Image.new("L", (4, 4)).save(tmp_path / f"{name}.jpg")
    rows = [replace(row, image_path=tmp_path / row.image_path.name) for row in TRAIN]
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(
            json.dumps(
                {
                    "qid": r.qid,
                    "image": r.image_path.name,
                    "question": r.question,
                    "answer": r.answer,
                    "question_type": r.question_type,
                }
            )
            + "\n"
            for r in rows
        )
    )
    assert main(["--data", str(train), "--output", str(tmp_path / "moved.jsonl"), "--seed", "3"]) == 0
    written = load_vqa_jsonl(tmp_path / "moved.jsonl")
    expected = attribute_questions(load_vqa_jsonl(train), seed=3)
    assert written == expected and written
    assert f"{len(expected)} moved questions written" in capsys.readouterr().out
