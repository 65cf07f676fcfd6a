"""Clinical validation: only an administrator, only with a signed statement, tied to the exact weights; the banner
on every answer follows it (validated, revoked, another adapter promoted)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from medvqa.db import AuditEvent, ModelValidation
from medvqa.errors import AccessDenied, InvalidInput
from medvqa.model.loading import load_vlm
from medvqa.services.audit import verify
from medvqa.services.model_status import live_model_status
from medvqa.services.validation import live_identity, revoke_validation, sign_validation
from tests import factories
from tests.workbench.apptest import errors, on_page, signed_in

STATEMENT = "Validated on 1,200 local chest radiographs (2026 Q3) for presence questions; not for CT or MR."


def _events(db, action):
    with db.read_session() as session:
        return session.scalars(select(AuditEvent).where(AuditEvent.action == action)).all()


def test_only_an_admin_with_a_signed_statement_validates_the_exact_weights(db, app_env, settings):
    admin, engineer = factories.make_user(db, "admin"), factories.make_user(db, "ml_engineer")
    model_ref = load_vlm(settings.base_model, device="cpu").model_ref
    assert not live_model_status(db, settings, model_ref, None).validated
    with pytest.raises(AccessDenied):
        sign_validation(db, engineer, settings, STATEMENT, "validation", factories.PASSWORD)
    with pytest.raises(InvalidInput, match="at least 40 characters"):
        sign_validation(db, admin, settings, "looks fine", "validation", factories.PASSWORD)
    with pytest.raises(InvalidInput, match="meaning 'ok'"):
        sign_validation(db, admin, settings, STATEMENT, "ok", factories.PASSWORD)
    with pytest.raises(AccessDenied, match="signature refused"):
        sign_validation(db, admin, settings, STATEMENT, "validation", "not the password")
    with db.read_session() as session:
        assert session.scalars(select(ModelValidation)).all() == []
    assert [e.outcome for e in _events(db, "model:validation:sign")] == ["denied", "failed"]

    signed = sign_validation(db, admin, settings, STATEMENT, "validation", factories.PASSWORD)
    identity = live_identity(db, settings)
    assert identity.adapter_sha256 is None and model_ref.endswith("@" + identity.model_weights)
    status = live_model_status(db, settings, model_ref, None)
    assert status.validated and status.banner().startswith(f"Validated for clinical use by {signed['signer']}")
    assert STATEMENT in status.banner()
    assert not live_model_status(db, settings, model_ref, "a" * 64).validated  # an adapter on it is not covered
    assert not live_model_status(db, settings, "other@ffffffffffff", None).validated  # nor other base weights
    event = _events(db, "model:validation:sign")[-1]
    assert event.outcome == "success" and event.details["meaning"].startswith("I have reviewed the evidence")
    with pytest.raises(InvalidInput, match="already validated"):
        sign_validation(db, admin, settings, STATEMENT, "responsibility", factories.PASSWORD)

    with pytest.raises(InvalidInput, match="say why"):
        revoke_validation(db, admin, signed["id"], " ")
    revoke_validation(db, admin, signed["id"], "new scanner installed")
    status = live_model_status(db, settings, model_ref, None)
    assert not status.validated and status.banner().startswith("Not validated for clinical use")
    with pytest.raises(InvalidInput, match="already revoked"):
        revoke_validation(db, admin, signed["id"], "again")
    with db.read_session() as session:
        row = session.get(ModelValidation, signed["id"])
        assert row.revoke_reason == "new scanner installed" and row.statement == STATEMENT  # the record stays
    assert verify(db).ok


def test_an_admin_validates_on_the_models_page_and_the_clinicians_banner_says_so(db, app_env, ct_study, clinician):
    admin = factories.make_user(db, "admin")
    app = on_page(admin, "app_pages/models.py")
    assert any('"not validated"' in caption.value for caption in app.caption)
    app.text_area(key="v_statement").input(STATEMENT)
    app.text_input(key="v_password").input(factories.PASSWORD)
    next(b for b in app.button if b.label == "Sign the validation").click().run()
    assert not errors(app), errors(app)
    assert any("The live model is validated" in s.value for s in app.success)
    ask = signed_in(clinician).run()
    ask.text_input(key="question").input("Is there a fracture?")
    ask.button(key="ask").click().run()
    banners = [element.value for element in ask.info if "Validated for clinical use" in element.value]
    assert banners and STATEMENT in banners[0]
    assert not any("Not validated" in w.value for w in ask.warning)
