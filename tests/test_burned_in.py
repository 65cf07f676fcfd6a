"""Burned-in text in the pixels: tesseract finds it, the instance is held with word boxes (never the text), a
reviewer confirms it or has the regions blacked out, and held pixels never reach the model."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont
from sqlalchemy import select

from medvqa.db import AuditEvent, Instance
from medvqa.errors import AccessDenied, HeldForReview, InvalidInput
from medvqa.imaging.burned_in import TextDetector, detect_text, engine_version
from medvqa.imaging.importer import hash_pixels
from medvqa.imaging.reader import decode_pixels
from medvqa.services.images import clean_burned_in_text, confirm_no_burned_in_text, model_input
from medvqa.services.review import held_instances
from medvqa.services.studies import import_paths
from tests import factories
from tests.dicom_factory import write_slice

pytestmark = pytest.mark.skipif(not engine_version(), reason="needs Debian's tesseract-ocr (.ci/run installs it)")
SECRET = "JOHN SMITH 12/03/1961"
ULTRASOUND = "1.2.840.10008.5.1.4.1.1.6.1"


@pytest.fixture
def settings(tmp_path):
    from medvqa.config import load_settings

    return load_settings(home=tmp_path / "home")


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size)


def ct_with_text(text: str = SECRET, size: int = 256) -> np.ndarray:
    """A 12-bit CT-like slice (a bright disc) with white text burned into its top-left corner."""
    y, x = np.mgrid[:size, :size]
    pixels = np.where((x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2, 1400, 100).astype(np.uint16)
    if text:
        canvas = Image.new("L", (size, size), 0)
        ImageDraw.Draw(canvas).text((6, 6), text, fill=255, font=font(14))
        pixels[np.asarray(canvas) > 128] = 4095
    return pixels


def import_ct(db, settings, tmp_path, text=SECRET, **attributes):
    path = write_slice(tmp_path / "in" / "slice.dcm", pixels=ct_with_text(text), bits_stored=12, **attributes)
    return import_paths(db, factories.OPERATOR, [path], settings)


def test_detector_finds_text_and_keeps_only_boxes():
    found = detect_text(ct_with_text())
    assert found.checked and found.found_text
    assert all(box.top < 40 and box.left < 200 for box in found.boxes)  # the corner it was drawn in
    assert "JOHN" not in repr(found.as_dict()) and "SMITH" not in repr(found.as_dict())
    clean = detect_text(ct_with_text(""))
    assert clean.checked and not clean.found_text


def test_text_in_a_ct_without_burned_in_annotation_holds_it_with_its_boxes(db, settings, tmp_path, caplog):
    caplog.set_level("DEBUG")
    report = import_ct(db, settings, tmp_path)
    assert [o.held for o in report.outcomes] == [True]
    with db.read_session() as session:
        instance = session.scalars(select(Instance)).one()
    detection = instance.burned_in_text
    assert detection["checked"] and detection["boxes"] and detection["engine"].startswith("tesseract")
    for needle in ("JOHN", "SMITH", "1961"):
        assert needle not in repr(detection) and needle not in caplog.text
    stored = pydicom.dcmread(settings.store_dir / instance.storage_path)
    assert stored.BurnedInAnnotation == "YES"
    rows = held_instances(db, factories.make_user(db, "reviewer"))
    assert [len(r["text_boxes"]) for r in rows] == [len(detection["boxes"])]


def test_a_secondary_capture_that_says_no_is_not_trusted(db, settings, tmp_path):
    report = import_ct(db, settings, tmp_path, modality="OT", BurnedInAnnotation="NO")
    assert [o.held for o in report.outcomes] == [True]


def test_a_clean_ct_that_says_no_is_not_checked_and_one_without_text_is_not_held(db, settings, tmp_path):
    report = import_ct(db, settings, tmp_path, text="", BurnedInAnnotation="NO")
    assert [o.held for o in report.outcomes] == [False]
    with db.read_session() as session:
        assert session.scalars(select(Instance.burned_in_text)).one() is None  # CT that says NO: no OCR
    other = import_paths(
        db,
        factories.OPERATOR,
        [write_slice(tmp_path / "b" / "b.dcm", pixels=ct_with_text(""), series_uid="1.2.3.4")],
        settings,
    )
    assert [o.held for o in other.outcomes] == [False]


def test_results_are_cached_by_pixel_hash(tmp_path):
    detector = TextDetector(tmp_path / "cache")
    pixels = ct_with_text()
    first = detector.detect(pixels, 1, hash_pixels(pixels))
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    again = detector.detect(pixels, 1, hash_pixels(pixels))
    assert (
        again.boxes == first.boxes
        and "JOHN" not in (tmp_path / "cache").joinpath(f"{hash_pixels(pixels)}.json").read_text()
    )


def test_held_images_never_reach_the_model_until_cleaned(db, settings, tmp_path):
    import_ct(db, settings, tmp_path)
    clinician, reviewer = factories.make_user(db, "clinician"), factories.make_user(db, "reviewer")
    with db.read_session() as session:
        instance = session.scalars(select(Instance)).one()
    with pytest.raises(HeldForReview):
        model_input(db, clinician, instance.series_id, settings, size=64)
    old_path = settings.store_dir / instance.storage_path
    with pytest.raises(AccessDenied):
        clean_burned_in_text(db, clinician, settings, instance.id)
    record = clean_burned_in_text(db, reviewer, settings, instance.id)
    assert record["by"] == reviewer.user_id and record["option"]["code"] == "113101" and record["boxes"]
    with db.read_session() as session:
        cleaned = session.get(Instance, instance.id)
        events = session.scalars(
            select(AuditEvent).where(
                AuditEvent.action == "study:instance:clean_burned_in", AuditEvent.outcome == "success"
            )
        ).all()
    assert cleaned.storage_path != instance.storage_path and not old_path.exists()
    assert cleaned.pixel_cleaning == record and cleaned.burned_in_confirmed_by == reviewer.user_id
    assert cleaned.pixel_hash == instance.pixel_hash  # the imported image's hash stays (leak checks use it)
    assert [e.details["boxes"] for e in events] == [len(record["boxes"])]
    stored = pydicom.dcmread(settings.store_dir / cleaned.storage_path)
    assert stored.BurnedInAnnotation == "NO"
    assert "113101" in [item.CodeValue for item in stored.DeidentificationMethodCodeSequence]
    pixels = decode_pixels(stored)
    assert hash_pixels(pixels) == record["pixel_hash"]
    for box in record["boxes"]:
        region = pixels[box["top"] : box["top"] + box["height"], box["left"] : box["left"] + box["width"]]
        assert int(region.max()) == int(pixels.min())
    assert not detect_text(pixels).found_text
    assert model_input(db, clinician, instance.series_id, settings, size=64).image.size == (64, 64)
    with pytest.raises(InvalidInput, match="not held"):
        clean_burned_in_text(db, reviewer, settings, instance.id)
    assert held_instances(db, reviewer) == []


def test_cleaning_needs_regions_and_refuses_boxes_outside_the_image(db, settings, tmp_path):
    from medvqa.imaging.burned_in import TextBox

    import_paths(
        db,
        factories.OPERATOR,
        [write_slice(tmp_path / "us.dcm", pixels=ct_with_text(""), modality="US", SOPClassUID=ULTRASOUND)],
        settings,
    )
    reviewer = factories.make_user(db, "reviewer")
    with db.read_session() as session:
        instance = session.scalars(select(Instance)).one()
    assert instance.held_for_burned_in_text  # ultrasound that does not say: a person looks, whatever OCR says
    with pytest.raises(InvalidInput, match="no detected text regions"):
        clean_burned_in_text(db, reviewer, settings, instance.id)
    with pytest.raises(InvalidInput, match="outside"):
        clean_burned_in_text(db, reviewer, settings, instance.id, [TextBox(0, 500, 10, 20, 10, 99.0)])
    assert confirm_no_burned_in_text(db, reviewer, [instance.id]) == [instance.id]


def test_png_with_burned_in_text_is_held_with_boxes(db, settings, tmp_path):
    canvas = Image.new("L", (320, 240), 20)
    ImageDraw.Draw(canvas).text((10, 200), "Uploader: Jane Roe 03-19-2003", fill=250, font=font(12))
    png = tmp_path / "teaching.png"
    canvas.save(png)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    report = import_paths(db, factories.OPERATOR, [png], settings)
    assert [o.held for o in report.outcomes] == [True]
    with db.read_session() as session:
        boxes = session.scalars(select(Instance.burned_in_text)).one()["boxes"]
    assert boxes and all(box["top"] > 180 for box in boxes)
