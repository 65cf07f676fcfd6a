"""Marking the live model validated for clinical use: only an administrator, only with a signed statement.

A validation names the weights it covers (the base weights' hash and the adapter's SHA-256), so promoting another
adapter, or serving another base, brings the "not validated" banner back by itself. The signature is the
administrator's password entered again with the meaning of the signature (21 CFR 11.50 / 11.200, as for
reviews); a wrong password is audited and counts towards the lockout. Revoking keeps the row and says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from compliance.policy import Action
from medvqa.db import Adapter, AdapterStatus, ModelValidation
from medvqa.db.base import utcnow
from medvqa.errors import InvalidInput, NotFound
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.transaction import write
from medvqa.services.users import reauthenticate

if TYPE_CHECKING:
    from medvqa.config import Settings
    from medvqa.db.engine import Database

MIN_STATEMENT = 40  # characters: the scope and the evidence, not a tick box
VALIDATION_MEANINGS = {
    "validation": "I have reviewed the evidence and validate this model for clinical use within the stated scope",
    "responsibility": "I take responsibility for the clinical use of this model within the stated scope",
}


@dataclass(frozen=True)
class ModelIdentity:
    """The weights the workbench answers with now."""

    name: str
    model_weights: str  # the hash part of "<folder>@<sha12>"
    adapter_sha256: str | None


def weights_part(model_ref: str) -> str:
    return model_ref.rpartition("@")[2]


def live_identity(db: Database, settings: Settings) -> ModelIdentity:
    """The live adapter (and its base), or the base model the workbench answers with when no adapter is live."""
    with db.read_session() as session:
        live = session.scalars(select(Adapter).where(Adapter.status == AdapterStatus.LIVE)).first()
        if live is not None:
            name = f"adapter #{live.id} ({live.name}) on {live.base_model_ref}"
            return ModelIdentity(name, weights_part(live.base_model_ref), live.sha256)
    from medvqa.model.loading import REF_HASH_CHARS, weights_sha256
    from medvqa.services.evaluation import base_model_path

    folder = base_model_path(settings)
    return ModelIdentity(f"the base model {folder.name} (no adapter)", weights_sha256(folder)[:REF_HASH_CHARS], None)


def validation_for(db: Database, model_ref: str, adapter_ref: str | None) -> dict[str, Any] | None:
    """The standing (not revoked) validation of exactly these weights, or None."""
    with db.read_session() as session:
        row = session.scalars(
            select(ModelValidation)
            .where(
                ModelValidation.model_weights == weights_part(model_ref),
                ModelValidation.adapter_sha256.is_(None)
                if adapter_ref is None
                else ModelValidation.adapter_sha256 == adapter_ref,
                ModelValidation.revoked_at.is_(None),
            )
            .order_by(ModelValidation.id.desc())
        ).first()
        return _as_dict(row) if row is not None else None


def sign_validation(
    db: Database, actor: Actor, settings: Settings, statement: str, meaning: str, password: str
) -> dict[str, Any]:
    """Record the administrator's signed statement for the live model; refuses a short statement, an unknown
    meaning, a wrong password (audited) and a model already validated."""
    authorize(db, actor, Action.MODEL_VALIDATE, "model")
    statement = statement.strip()
    if len(statement) < MIN_STATEMENT:
        raise InvalidInput(f"the statement must say the scope and the evidence in at least {MIN_STATEMENT} characters")
    if meaning not in VALIDATION_MEANINGS:
        raise InvalidInput(f"meaning {meaning!r}: choose one of {', '.join(VALIDATION_MEANINGS)}")
    identity = live_identity(db, settings)
    details = {"model_weights": identity.model_weights, "adapter_sha256": identity.adapter_sha256}
    signer = reauthenticate(db, actor, password, Action.MODEL_VALIDATE, "model", None, details)
    if validation_for(db, "@" + identity.model_weights, identity.adapter_sha256) is not None:
        raise InvalidInput(f"{identity.name} is already validated; revoke that validation first to replace it")

    def work(session: Session) -> dict[str, Any]:
        row = ModelValidation(
            model_weights=identity.model_weights,
            adapter_sha256=identity.adapter_sha256,
            name=identity.name,
            statement=statement,
            signed_by=actor.user_id,
            signer_name=signer,
            signature_meaning=VALIDATION_MEANINGS[meaning],
        )
        session.add(row)
        session.flush()
        signature = {"name": signer, "time": row.signed_at.isoformat(), "meaning": row.signature_meaning}
        audit.record(session, actor, Action.MODEL_VALIDATE, "model_validation", row.id, details=details | signature)
        return _as_dict(row)

    return write(db, work)


def revoke_validation(db: Database, actor: Actor, validation_id: int, reason: str) -> None:
    """Withdraw a validation (the banner returns at the next answer); the row and its signature stay."""
    authorize(db, actor, Action.MODEL_VALIDATION_REVOKE, "model_validation", validation_id)
    if not reason.strip():
        raise InvalidInput("say why the validation is revoked")

    def work(session: Session) -> None:
        row = session.get(ModelValidation, validation_id)
        if row is None:
            raise NotFound(f"validation {validation_id} does not exist")
        if row.revoked_at is not None:
            raise InvalidInput(f"validation {validation_id} was already revoked")
        row.revoked_by, row.revoked_at, row.revoke_reason = actor.user_id, utcnow(), reason.strip()
        session.flush()
        details = {"reason": row.revoke_reason, "model_weights": row.model_weights, "adapter": row.adapter_sha256}
        audit.record(session, actor, Action.MODEL_VALIDATION_REVOKE, "model_validation", row.id, details=details)

    write(db, work)


def list_validations(db: Database, actor: Actor) -> list[dict[str, Any]]:
    """Every validation, newest first, standing or revoked."""
    authorize(db, actor, Action.ADAPTER_READ, "model_validation")
    with db.read_session() as session:
        rows = session.scalars(select(ModelValidation).order_by(ModelValidation.id.desc())).all()
        return [_as_dict(row) for row in rows]


def _as_dict(row: ModelValidation) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "model_weights": row.model_weights,
        "adapter_sha256": row.adapter_sha256,
        "statement": row.statement,
        "signer": row.signer_name,
        "meaning": row.signature_meaning,
        "signed_at": row.signed_at.isoformat() if row.signed_at else None,
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
        "revoke_reason": row.revoke_reason,
    }
