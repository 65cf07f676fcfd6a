"""Demo studies: the VQA-RAD teaching images (CC0, MedPix) as DICOM secondary-capture files.

Modality and body part come from the training split's questions only (test.jsonl stays untouched).
The files say BurnedInAnnotation NO, as MedPix published them, but import does not trust that: every secondary
capture goes through the OCR check, and most VQA-RAD pictures carry a MedPix mark, an uploader's name and a
date in a corner, so most demo studies wait for a reviewer (Review > Held instances: confirm, or black the
text out). OCR results are cached by pixel hash under MEDVQA_HOME, so a second `medvqa demo` costs nothing.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

from medvqa.imaging.secondary_capture import dataset_from_image

BODY_PARTS = {"HEAD": "HEAD", "CHEST": "CHEST", "ABD": "ABDOMEN"}
MODALITY_WORDS = [  # first match wins: (pattern in a question or answer, DICOM modality)
    (r"\b(mri?|flair|t1|t2|dwi|adc|diffusion|gadolinium)\b", "MR"),
    (r"\b(ct|computed tomography)\b", "CT"),
    (r"\b(x-?\s?ray|xray|radiograph\w*|plain film|film|cxr)\b", "DX"),
    (r"\b(ultrasound|sonograph\w*)\b", "US"),
]


def infer_tags(train_jsonl: Path) -> dict[str, tuple[str, str]]:
    """image name -> (modality, body part): the modality that every training question and answer naming one
    agrees on (a modality question answered "no" votes for nothing; disagreeing votes give OT, unknown)."""
    votes: dict[str, Counter[str]] = defaultdict(Counter)
    organ: dict[str, str] = {}
    for line in train_jsonl.read_text().splitlines():
        row = json.loads(line)
        name = Path(row["image"]).name
        organ.setdefault(name, BODY_PARTS.get(row.get("organ", ""), ""))
        answer = row["answer"].strip().lower()
        if answer == "no" and row.get("question_type") == "MODALITY":
            continue
        text = f"{row['question']} {answer if answer not in ('yes', 'no') else ''}".lower()
        for pattern, code in MODALITY_WORDS:
            if re.search(pattern, text):
                votes[name][code] += 1
                break
    return {name: (_agreed(votes[name]), part) for name, part in organ.items()}


def _agreed(votes: Counter[str]) -> str:
    """The modality every vote names; OT (other: unknown) when none does or they disagree, rather than a guess."""
    return next(iter(votes)) if len(votes) == 1 else "OT"


def build_demo_files(data_dir: Path, out_dir: Path, max_pixels: int = 300_000_000) -> list[Path]:
    """Write one secondary-capture file per VQA-RAD image into `out_dir` (skipping those already there)."""
    from pydicom import dcmwrite

    tags = infer_tags(data_dir / "train.jsonl")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for image in sorted((data_dir / "images").glob("*.jpg")):
        target = out_dir / f"{image.stem}.dcm"
        if not target.exists():
            modality, body_part = tags.get(image.name, ("OT", ""))
            ds = dataset_from_image(
                image.read_bytes(), max_pixels, modality=modality, body_part=body_part, burned_in_annotation="NO"
            )
            dcmwrite(target, ds, enforce_file_format=True)
        written.append(target)
    return written


MULTI_FRAME_DEMO = "examples_ybr_color.dcm"


def multi_frame_demo_file() -> Path | None:
    """A real multi-frame series for trying slice scrolling: pydicom's `examples_ybr_color.dcm` (30 frames of a
    colour ultrasound volume, JPEG baseline, from the freely licensed sample sets its test data README lists),
    named by path so nothing is downloaded; None when this pydicom does not ship it."""
    import pydicom

    path = Path(pydicom.__file__).parent / "data" / "test_files" / MULTI_FRAME_DEMO
    return path if path.is_file() else None
