"""`medvqa demo`: VQA-RAD teaching images become de-identified demo studies."""

from __future__ import annotations

import json

import numpy as np
import pydicom
from click.testing import CliRunner
from PIL import Image

from medvqa.cli import main
from medvqa.imaging.demo import build_demo_files, infer_tags


def fake_vqa_rad(root):
    (root / "images").mkdir(parents=True)
    for shade, name in enumerate(("synpic1", "synpic2", "synpic3")):  # different pixels: different studies
        Image.fromarray(np.full((40, 30), 60 * shade, dtype=np.uint8)).save(root / "images" / f"{name}.jpg")
    rows = [
        {
            "image": "images/synpic1.jpg",
            "question": "Is this an MRI?",
            "answer": "Yes",
            "question_type": "MODALITY",
            "organ": "HEAD",
        },
        {
            "image": "images/synpic2.jpg",
            "question": "Is this a CT?",
            "answer": "No",
            "question_type": "MODALITY",
            "organ": "CHEST",
        },
        {
            "image": "images/synpic2.jpg",
            "question": "Is this a PA film?",
            "answer": "Yes",
            "question_type": "PLANE",
            "organ": "CHEST",
        },
        {
            "image": "images/synpic3.jpg",
            "question": "Is there a mass?",
            "answer": "No",
            "question_type": "PRES",
            "organ": "ABD",
        },
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_tags_come_from_training_questions(tmp_path):
    tags = infer_tags(fake_vqa_rad(tmp_path / "vqa").joinpath("train.jsonl"))
    assert tags == {"synpic1.jpg": ("MR", "HEAD"), "synpic2.jpg": ("DX", "CHEST"), "synpic3.jpg": ("OT", "ABDOMEN")}


def test_disagreeing_questions_give_an_unknown_modality_not_a_guess(tmp_path):
    root = fake_vqa_rad(tmp_path / "vqa")
    extra = {"image": "images/synpic1.jpg", "question": "Is the lesion seen on this CT?", "answer": "yes"}
    with (root / "train.jsonl").open("a") as rows:
        rows.write(json.dumps({**extra, "question_type": "PRES", "organ": "HEAD"}) + "\n")
    assert infer_tags(root / "train.jsonl")["synpic1.jpg"] == ("OT", "HEAD")  # MR once, CT once: unknown


def test_demo_files_are_secondary_captures_not_held(tmp_path):
    files = build_demo_files(fake_vqa_rad(tmp_path / "vqa"), tmp_path / "out")
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.Modality == "MR" and ds.BurnedInAnnotation == "NO"
    assert ds.pixel_array.shape == (40, 30)


def test_demo_command_imports_the_studies_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVQA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDVQA_DEMO_DATA", str(fake_vqa_rad(tmp_path / "vqa")))
    for name in ("MEDVQA_DATABASE_URL", "MEDVQA_AUDIT_ANCHOR"):
        monkeypatch.delenv(name, raising=False)
    first = CliRunner().invoke(main, ["demo", "--no-app"])
    assert first.exit_code == 0 and "demo studies: 3 imported" in first.stdout
    assert "multi-slice demo series: imported" in first.stdout
    second = CliRunner().invoke(main, ["demo", "--no-app"])
    assert "0 imported, 3 already there" in second.stdout and "multi-slice demo series: already there" in second.stdout
    listing = json.loads(CliRunner().invoke(main, ["studies", "list", "--json"]).stdout)["studies"]
    assert sorted(s["modality"] for s in listing) == ["DX", "MR", "OT", "US"]
    assert all(s["held"] == 0 for s in listing if s["modality"] != "US")  # ultrasound is always OCR-checked
    [volume] = [s for s in listing if s["modality"] == "US"]
    assert volume["instances"] == 1 and volume["series"] == 1


def test_demo_without_data_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVQA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDVQA_DEMO_DATA", str(tmp_path / "missing"))
    monkeypatch.delenv("MEDVQA_DATABASE_URL", raising=False)
    monkeypatch.delenv("MEDVQA_AUDIT_ANCHOR", raising=False)
    result = CliRunner().invoke(main, ["demo", "--no-app"])
    assert result.exit_code == 0 and "VQA-RAD not found" in result.stderr
