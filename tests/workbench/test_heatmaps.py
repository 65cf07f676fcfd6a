"""Where the model looked: the saliency map on the image-token grid for several model families, the sanity
checks that gate it, and the service that makes it once per answer, stores it with its hash, and audits it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from medvqa.db import AnswerHeatmap, AuditEvent
from medvqa.errors import AccessDenied, InvalidInput
from medvqa.model.generation import answer
from medvqa.model.loading import load_vlm
from medvqa.model.saliency import (
    CHANGED_BELOW,
    SaliencyMap,
    SanityCheck,
    check_images,
    rank_correlation,
    saliency,
    sanity_check,
    supports_saliency,
)
from medvqa.services.ask import ImageChoice, ask, load_answering_model
from medvqa.services.heatmaps import answer_heatmap, stored_heatmap
from tests import factories

QUESTION = "Is there a mass?"


@pytest.fixture(scope="module")
def loaded_models(tiny_checkpoints):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_vlm(tiny_checkpoints(family), device="cpu", dtype="float32")
        return cache[family]

    return get


@pytest.mark.parametrize("family", ["llava", "idefics3", "gemma3", "paligemma"])
def test_a_map_on_the_token_grid_for_each_family(loaded_models, family, torch_single_thread):
    loaded = loaded_models(family)
    first, _ = check_images(64)
    given = answer(loaded, first, QUESTION)
    assert supports_saliency(loaded) and given.token_ids
    found = saliency(loaded, first, QUESTION, given.token_ids)
    rows, cols = found.grid.shape
    assert rows == cols >= 1 and found.grid.max() == pytest.approx(1.0) and found.grid.min() >= 0.0
    again = saliency(loaded, first, QUESTION, given.token_ids)
    assert again.sha256() == found.sha256()  # deterministic: the hash in the provenance identifies the map


def test_the_map_depends_on_the_answer_explained(loaded_models, torch_single_thread):
    loaded = loaded_models("llava")
    image, _ = check_images(64)
    yes = loaded.processor.tokenizer.encode("yes", add_special_tokens=False)
    no = loaded.processor.tokenizer.encode("no", add_special_tokens=False)
    assert saliency(loaded, image, QUESTION, yes).sha256() != saliency(loaded, image, QUESTION, no).sha256()


def test_the_sanity_checks_restore_the_weights_exactly(loaded_models, torch_single_thread):
    import torch

    loaded = loaded_models("llava")
    before = {name: value.clone() for name, value in loaded.model.state_dict().items()}
    check = sanity_check(loaded)
    after = loaded.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert -1.0 <= check.weights_randomised <= 1.0 and -1.0 <= check.other_image <= 1.0


def test_a_map_that_passes_neither_check_is_not_trusted():
    assert SanityCheck(0.95, 0.99).trusted is False
    assert SanityCheck(0.2, 0.99).trusted and SanityCheck(0.95, 0.1).trusted
    assert SanityCheck(CHANGED_BELOW, CHANGED_BELOW).trusted is False  # "changed" means strictly below
    payload = SanityCheck(0.2, 0.95).to_json()
    assert payload["passes_model_randomisation"] and not payload["passes_data_check"]


def test_rank_correlation_and_the_overlay():
    grid = np.array([[0.0, 0.5], [0.25, 1.0]], dtype=np.float32)
    same, reversed_ = SaliencyMap(grid), SaliencyMap(1 - grid)
    assert rank_correlation(same, same) == pytest.approx(1.0)
    assert rank_correlation(same, reversed_) == pytest.approx(-1.0)
    picture = Image.new("RGB", (40, 40), (0, 0, 0))
    shown = np.asarray(same.overlay(picture, 1.0))
    assert shown[35, 35].sum() > shown[5, 5].sum()  # the bottom-right token is the hottest
    assert np.asarray(same.overlay(picture, 0.0)).sum() == 0  # opacity 0: the image alone
    with pytest.raises(ValueError, match="opacity"):
        same.overlay(picture, 1.5)
    assert SaliencyMap.from_json(same.to_json()).sha256() == same.sha256()


# --- the service: once per answer, stored with its hash, audited, only by the model that answered ---


@pytest.fixture
def asked(db, settings, ct_study, clinician, torch_single_thread):
    model = load_answering_model(db, settings)
    study_id, _ = ct_study
    result = ask(db, clinician, settings, model, study_id, QUESTION, ImageChoice(slices=1), "PRES")
    return model, result


def test_a_heatmap_is_made_once_stored_and_audited(db, settings, clinician, asked):
    model, result = asked
    made = answer_heatmap(db, clinician, settings, model, result.answer_id)
    assert made.created and len(made.sha256) == 64 and made.sha256 == made.saliency.sha256()
    assert set(made.checks) >= {"passes_model_randomisation", "passes_data_check"}
    again = answer_heatmap(db, clinician, settings, model, result.answer_id)
    assert not again.created and again.sha256 == made.sha256
    assert stored_heatmap(db, result.answer_id).sha256 == made.sha256
    with db.read_session() as session:
        rows = session.scalars(select(AnswerHeatmap)).all()
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "answer:heatmap:create")).all()
    assert [row.answer_id for row in rows] == [result.answer_id]
    assert [(event.object_id, event.details["sha256"]) for event in events] == [(str(result.answer_id), made.sha256)]


def test_roles_that_may_not_read_answers_get_no_heatmap(db, settings, asked):
    model, result = asked
    auditor = factories.make_user(db, "auditor")
    with pytest.raises(AccessDenied):
        answer_heatmap(db, auditor, settings, model, result.answer_id)
    with db.read_session() as session:
        assert session.scalars(select(AnswerHeatmap)).all() == []


def test_another_model_cannot_explain_the_answer(db, settings, clinician, asked, tiny_checkpoints, monkeypatch):
    _, result = asked
    monkeypatch.setenv("MEDVQA_BASE_MODEL", str(tiny_checkpoints("gemma3")))
    from medvqa.config import load_settings

    other_settings = load_settings()
    other = load_answering_model(db, other_settings)
    with pytest.raises(InvalidInput, match="model serving now is another"):
        answer_heatmap(db, clinician, other_settings, other, result.answer_id)
