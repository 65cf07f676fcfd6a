"""Dataset snapshots from reviewed feedback: what goes in, the patient split, the content hash, the refusals."""

# ruff: noqa: F811 - fixtures imported from tests/ helpers are test parameters by design

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from sqlalchemy import select

from medvqa.config import load_settings
from medvqa.db import Study
from medvqa.imaging.store import ContentStore
from medvqa.training.data import load_vqa_jsonl
from medvqa.training.locked_test import LockedTestSetMissing, load_locked_test_set
from medvqa.training.snapshot import MANIFEST, SnapshotRefused, check_no_leak, freeze_snapshot, split_by_patient
from tests import factories
from tests.model_factory import torch_single_thread  # noqa: F401 - pytest fixture
from tests.round_factory import (
    cheap_passwords,  # noqa: F401 - pytest fixture
    correct,
    import_image,
    record_model_answer,
    review,
    write_locked_test_set,
    write_png,
)


@pytest.fixture
def reviewed(db, tmp_path, cheap_passwords):
    """Five studies (five patients) and answers covering every rule of what a snapshot takes."""
    settings = load_settings(home=tmp_path / "home")
    clinician = factories.make_user(db, "clinician")
    first, second = factories.make_user(db, "reviewer"), factories.make_user(db, "reviewer")
    images = [import_image(db, settings, write_png(tmp_path / f"img{i}.png", i)) for i in range(5)]
    ids = {}
    ask = lambda i, q, a: record_model_answer(db, settings, clinician, images[i], q, a)  # noqa: E731
    ids["confirmed"] = ask(0, "Is there a fracture?", "yes")
    review(db, first, ids["confirmed"], "correct")
    ids["referenced"] = ask(1, "Is there a mass?", "yes")
    correct(db, clinician, ids["referenced"], "maybe")  # the reviewer's answer below wins over this correction
    review(db, first, ids["referenced"], "incorrect", "no")
    ids["corrected"] = ask(2, "Where is the lesion?", "left")
    correct(db, clinician, ids["corrected"], "right lung")
    ids["rated_only"] = ask(3, "Is it normal?", "no")
    correct(db, clinician, ids["rated_only"], "", verdict="correct")
    ids["disputed"] = ask(3, "Is there fluid?", "no")
    review(db, first, ids["disputed"], "correct")
    review(db, second, ids["disputed"], "incorrect", "yes")
    ids["fourth"] = ask(3, "Is the heart enlarged?", "no")
    review(db, second, ids["fourth"], "partial", "yes, mildly")
    ids["fifth"] = ask(4, "Is this a CT?", "yes")
    review(db, second, ids["fifth"], "correct")
    return settings, images, ids


def _freeze(db, settings, **kwargs):
    options = {"validation_fraction": 0.2, "min_examples": 1} | kwargs
    with db.read_session() as session:
        return freeze_snapshot(session, ContentStore(settings.store_dir), settings.home / "datasets", **options)


def test_snapshot_takes_reviews_over_corrections_and_leaves_out_the_rest(db, reviewed):
    settings, _, ids = reviewed
    snapshot = _freeze(db, settings)
    items = {item.answer_id: item for item in snapshot.items}
    assert set(items) == {ids[k] for k in ("confirmed", "referenced", "corrected", "fourth", "fifth")}
    assert (items[ids["confirmed"]].answer, items[ids["confirmed"]].source) == ("yes", "review")
    assert (items[ids["referenced"]].answer, items[ids["referenced"]].source) == ("no", "review")
    assert (items[ids["corrected"]].answer, items[ids["corrected"]].source) == ("right lung", "correction")
    assert items[ids["corrected"]].answer_type == "OPEN" and items[ids["confirmed"]].answer_type == "CLOSED"
    assert snapshot.left_out == {"readers disagree": 1, "feedback without a correction or review": 1}
    assert items[ids["fifth"]].organ == "CHEST" and items[ids["fifth"]].question_type == "PRES"


def test_split_is_by_patient_and_files_are_complete(db, reviewed):
    settings, _, _ = reviewed
    snapshot = _freeze(db, settings)
    splits: dict[str, set[str]] = {}
    for item in snapshot.items:
        splits.setdefault(item.patient, set()).add(item.split)
    assert all(len(s) == 1 for s in splits.values())  # no patient on both sides
    assert snapshot.split_counts()["validation"] >= 1 and snapshot.split_counts()["train"] >= 1
    train, validation = load_vqa_jsonl(snapshot.train_file), load_vqa_jsonl(snapshot.validation_file)
    assert len(train) + len(validation) == len(snapshot.items)
    assert snapshot.folder.name == snapshot.content_sha256
    manifest = json.loads((snapshot.folder / MANIFEST).read_text())
    assert manifest["content_sha256"] == snapshot.content_sha256 and len(manifest["items"]) == 5
    with Image.open(train[0].image_path) as image:  # plain pixels, exactly the model's input
        assert image.format == "PNG" and image.size == (32, 32) and not image.info.get("dicom")
    assert not list(snapshot.folder.rglob("*.dcm"))


def test_same_feedback_same_hash_and_folder(db, reviewed):
    settings, _, _ = reviewed
    first, second = _freeze(db, settings), _freeze(db, settings)
    assert first.content_sha256 == second.content_sha256 and first.folder == second.folder
    assert len([p for p in (settings.home / "datasets").iterdir() if not p.name.startswith(".")]) == 1


def test_too_small_snapshot_is_refused(db, reviewed):
    settings, _, _ = reviewed
    with pytest.raises(SnapshotRefused, match=r"holds 5 reviewed example.*at least 6"):
        _freeze(db, settings, min_examples=6)


def test_since_keeps_only_later_decisions(db, reviewed):
    settings, _, _ = reviewed
    with pytest.raises(SnapshotRefused, match="holds 0"):
        _freeze(db, settings, since=datetime.now(UTC) + timedelta(seconds=5))
    assert len(_freeze(db, settings, since=datetime.now(UTC) - timedelta(hours=1)).items) == 5


def test_locked_test_set_images_or_patients_in_the_snapshot_are_refused(db, reviewed, tmp_path):
    settings, images, ids = reviewed
    snapshot = _freeze(db, settings)
    leaking = load_locked_test_set(write_locked_test_set(tmp_path / "t1.jsonl", [images[0].png]))
    with pytest.raises(SnapshotRefused, match=rf"1 snapshot item.*answers {ids['confirmed']};"):
        check_no_leak(snapshot, leaking)
    with db.read_session() as session:
        patient = session.scalars(select(Study.patient_pseudonym).where(Study.id == images[2].study_id)).one()
    other = write_png(tmp_path / "other.png", 99)
    by_patient = load_locked_test_set(write_locked_test_set(tmp_path / "t2.jsonl", [other], [patient]))
    assert by_patient.patients == {patient}
    with pytest.raises(SnapshotRefused, match=f"answers {ids['corrected']};"):
        check_no_leak(snapshot, by_patient)
    check_no_leak(snapshot, load_locked_test_set(write_locked_test_set(tmp_path / "t3.jsonl", [other])))


def test_no_locked_test_set_is_a_clear_refusal():
    with pytest.raises(LockedTestSetMissing, match="MEDVQA_LOCKED_TEST_SET"):
        load_locked_test_set(None)


@given(st.lists(st.text(min_size=1, max_size=8), min_size=2, max_size=30, unique=True), st.floats(0.01, 0.99))
def test_patient_split_is_order_free_and_never_empty(patients, fraction):
    validation = split_by_patient(patients, fraction)
    assert validation == split_by_patient(list(reversed(patients)), fraction)
    assert 1 <= len(validation) < len(patients)


def test_one_patient_cannot_be_split():
    with pytest.raises(SnapshotRefused, match="at least two"):
        split_by_patient(["p1", "p1"], 0.2)
