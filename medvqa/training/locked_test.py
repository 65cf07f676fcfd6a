"""The locked test set every fine-tuning round is scored on, and what identifies its patients for the leak check.

It is a VQA jsonl named by the `locked_test_set` setting (MEDVQA_LOCKED_TEST_SET). Rows may carry `patient`,
the patient pseudonym the import gave the study; a snapshot holding any of them is refused. Public sets such as
VQA-RAD name no patients: there the pixel hash of each test image (the same hash `medvqa import` stores for an
instance made from that picture) stands in, so a snapshot showing any test image is refused instead. The stand-in
is weaker: another image of the same patient is not caught.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from medvqa.errors import ImportRefused, InvalidInput
from medvqa.hashing import file_sha256
from medvqa.training.data import VQAExample, load_vqa_jsonl

_MAX_PIXELS = 300_000_000


@dataclass(frozen=True)
class LockedTestSet:
    path: Path
    sha256: str  # of the jsonl file
    examples: list[VQAExample]
    patients: frozenset[str]  # from the rows' `patient` field; empty for sets without patients
    pixel_hashes: frozenset[str]  # of the images, as `medvqa import` computes them


class LockedTestSetMissing(InvalidInput):
    """No locked test set is configured, so no round can be scored."""


def load_locked_test_set(path: Path | None) -> LockedTestSet:
    """Read the set, its patients and the pixel hash of every image; refuse when none is configured."""
    if path is None:
        raise LockedTestSetMissing(
            "no locked test set: set MEDVQA_LOCKED_TEST_SET to a VQA jsonl the rounds are scored on and never "
            "trained on (for example VQA-RAD's test.jsonl)"
        )
    examples = load_vqa_jsonl(path)
    digest = file_sha256(path)
    patients = {str(json.loads(line)["patient"]) for line in _lines(path) if "patient" in json.loads(line)}
    hashes = {image_pixel_hash(image) for image in sorted({e.image_path for e in examples})}
    return LockedTestSet(Path(path), digest, examples, frozenset(patients), frozenset(hashes))


def _lines(path: Path) -> list[str]:
    return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def image_pixel_hash(image: Path) -> str:
    """The pixel hash `medvqa import` stores for this PNG/JPEG (or DICOM) file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from medvqa.imaging.importer import hash_pixels
    from medvqa.imaging.reader import decode_pixels
    from medvqa.imaging.secondary_capture import dataset_from_image, is_plain_image

    try:
        data = image.read_bytes()
        if is_plain_image(data):
            return hash_pixels(decode_pixels(dataset_from_image(data, _MAX_PIXELS)))
        return hash_pixels(decode_pixels(pydicom.dcmread(image)))
    except (ImportRefused, InvalidDicomError, OSError, ValueError) as exc:
        raise InvalidInput(f"locked test image {image}: cannot read its pixels ({exc})") from None
