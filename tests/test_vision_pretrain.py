"""Stage 0 of the default recipe: image-level labels from training questions, and the tower trained on them."""

# ruff: noqa: F811 - fixtures imported from tests/model_factory.py are test parameters by design

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medvqa.model.default_weights import vision_modules
from medvqa.model.loading import load_vlm
from medvqa.training.data import VQAExample
from medvqa.training.vision_pretrain import ATTRIBUTES, IGNORE, image_labels, pretrain_vision_tower
from tests.model_factory import tiny_checkpoints, torch_single_thread  # noqa: F401 - fixtures

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad" / "images"


def vqa_row(image: str, question: str, answer: str, organ: str = "HEAD", question_type: str = "MODALITY") -> VQAExample:
    """A training row about /data/IMAGE.jpg (no file needed: labels are read from the text alone)."""
    closed = answer.lower() in ("yes", "no")
    return VQAExample(
        qid=f"{image}-{question}-{answer}",
        image_path=Path(f"/data/{image}.jpg"),
        question=question,
        answer=answer,
        answer_type="CLOSED" if closed else "OPEN",
        question_type=question_type,
        organ=organ,
    )


def _label(labels: dict[Path, dict[str, int]], image: str, attribute: str) -> str | None:
    index = labels[Path(f"/data/{image}.jpg")][attribute]
    return None if index == IGNORE else ATTRIBUTES[attribute][index]


def test_labels_come_from_open_answers_and_from_yes_to_a_question_naming_one_class():
    labels = image_labels(
        [
            vqa_row("a", "What imaging modality is this?", "MR - FLAIR"),  # normalised "mr flair" -> mri
            vqa_row("b", "Is this a CT?", "Yes", organ="ABD"),
            vqa_row("c", "Is this an MRI?", "No", organ="CHEST"),  # a no says nothing about what it is
            vqa_row("d", "In what plane is this image?", "Axial"),
            vqa_row("e", "Is this a PA film?", "yes", organ="CHEST"),  # names a plane (pa) and a modality (film)
        ]
    )
    assert _label(labels, "a", "modality") == "mri" and _label(labels, "a", "plane") is None
    assert _label(labels, "b", "modality") == "ct" and _label(labels, "b", "organ") == "abdomen"
    assert _label(labels, "c", "modality") is None and _label(labels, "c", "organ") == "chest"
    assert _label(labels, "d", "plane") == "axial" and _label(labels, "d", "modality") is None
    assert _label(labels, "e", "plane") == "frontal" and _label(labels, "e", "modality") == "xray"


def test_a_question_naming_two_classes_or_a_tie_leaves_the_attribute_unknown():
    labels = image_labels(
        [
            vqa_row("a", "Is this a CT or an MRI?", "yes"),  # which one? unknown
            vqa_row("b", "What modality?", "CT"),
            vqa_row("b", "What kind of scan?", "MRI"),  # one vote each: a tie
            vqa_row("c", "What modality?", "CT"),
            vqa_row("c", "What kind of scan?", "CT with contrast"),
            vqa_row("c", "How was it taken?", "T2 MRI"),  # outvoted two to one
        ]
    )
    assert _label(labels, "a", "modality") is None
    assert _label(labels, "b", "modality") is None
    assert _label(labels, "c", "modality") == "ct"


def test_words_inside_other_words_do_not_count():
    labels = image_labels([vqa_row("a", "What is seen?", "Pancreatic mass")])  # "pa" inside "pancreatic"
    assert _label(labels, "a", "plane") is None and _label(labels, "a", "modality") is None


def test_pretraining_moves_the_tower_only_and_reports_what_it_learnt(tiny_checkpoints, torch_single_thread):
    images = sorted(IMAGES.glob("*.jpg"))[:6]
    if len(images) < 6:
        pytest.skip(f"VQA-RAD images not found at {IMAGES}")
    rows = [
        VQAExample(
            str(i), path, "Is this a CT?", "yes" if i % 2 else "no", "CLOSED", "MODALITY", "HEAD" if i < 3 else "CHEST"
        )
        for i, path in enumerate(images)
    ]
    loaded = load_vlm(tiny_checkpoints("llava"), device="cpu", dtype="float32")
    before = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}

    summary = pretrain_vision_tower(
        loaded.model, loaded.processor, rows, epochs=1, learning_rate=1e-3, batch_size=4, seed=0, progress=False
    )

    after = dict(loaded.model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("model.vision_tower.") for name in changed)
    assert summary["images"] == 6 and summary["labelled"] == {"organ": 6, "modality": 3, "plane": 0}
    assert summary["steps"] == 12  # 6 images x 8 views / batch of 4
    assert set(summary["train_accuracy"]) == set(ATTRIBUTES) and summary["train_accuracy"]["plane"] is None
    assert vision_modules(loaded.model)["vision_tower"] is loaded.model.model.vision_tower  # trained in place
