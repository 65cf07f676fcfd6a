"""From stored studies to the exact model input; held instances wait for a reviewer."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from medvqa.config import load_settings
from medvqa.db import AuditEvent, Instance, Series
from medvqa.errors import AccessDenied, HeldForReview
from medvqa.services.images import confirm_no_burned_in_text, load_series, model_input
from medvqa.services.studies import import_paths
from tests import factories
from tests.phi_factory import write_phi_series


@pytest.fixture
def settings(tmp_path):
    return load_settings(home=tmp_path / "home")


def import_series(db, settings, folder, modality="CT", count=3, first_index=0):
    paths = write_phi_series(folder, count, modality=modality, first_index=first_index)
    import_paths(db, factories.OPERATOR, paths, settings)
    with db.read_session() as session:
        return session.scalars(select(Series.id).order_by(Series.id.desc())).first()


def test_stored_series_becomes_an_ordered_volume(db, settings, tmp_path, clinician):
    series_id = import_series(db, settings, tmp_path / "ct")
    volume = load_series(db, clinician, series_id, settings)
    assert volume.pixels.shape == (3, 16, 16)
    assert volume.positions == (0.0, 2.5, 5.0)
    assert volume.default_window.center == 40 and volume.default_window.width == 400
    # the modality LUT was applied: stored value v becomes v - 1024 HU
    assert float(volume.pixels[0, 0, 0]) == -1024.0


def test_model_input_names_what_the_model_saw(db, settings, tmp_path, clinician):
    series_id = import_series(db, settings, tmp_path / "ct")
    first = model_input(db, clinician, series_id, settings, slices=1, window="ct_brain", size=64)
    again = model_input(db, clinician, series_id, settings, slices=1, window="ct_brain", size=64)
    other = model_input(db, clinician, series_id, settings, slices=1, window="ct_bone", size=64)
    assert first.image.size == (64, 64) and first.preprocess_hash == again.preprocess_hash
    assert other.preprocess_hash != first.preprocess_hash
    assert first.selection["kind"] == "slice" and first.selection["slices"] == [1]


def test_held_instances_need_a_reviewer_before_the_model_sees_them(db, settings, tmp_path, clinician):
    series_id = import_series(db, settings, tmp_path / "us", modality="US", count=1, first_index=20)
    with pytest.raises(HeldForReview, match="reviewer must confirm"):
        model_input(db, clinician, series_id, settings)
    with db.read_session() as session:
        instance_id = session.scalars(select(Instance.id).where(Instance.series_id == series_id)).one()
    with pytest.raises(AccessDenied):
        confirm_no_burned_in_text(db, clinician, [instance_id])
    reviewer = factories.make_user(db, "reviewer")
    assert confirm_no_burned_in_text(db, reviewer, [instance_id]) == [instance_id]
    assert confirm_no_burned_in_text(db, reviewer, [instance_id]) == []  # already confirmed
    assert model_input(db, clinician, series_id, settings).image.size == (384, 384)
    with db.read_session() as session:
        event = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.action == "study:instance:confirm_burned_in", AuditEvent.outcome == "success")
            .order_by(AuditEvent.seq)
        ).first()
    assert event.actor_user_id == reviewer.user_id and event.details["instances"] == [instance_id]


def test_roles_without_image_access_are_refused(db, settings, tmp_path):
    series_id = import_series(db, settings, tmp_path / "ct")
    auditor = factories.make_user(db, "auditor")
    with pytest.raises(AccessDenied):
        load_series(db, auditor, series_id, settings)
