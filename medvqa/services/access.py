"""Access checks against compliance.policy: deny by default, and audit every refusal."""

from __future__ import annotations

from compliance.policy import is_allowed
from medvqa.db.engine import Database
from medvqa.errors import AccessDenied
from medvqa.services import audit
from medvqa.services.audit import Actor
from medvqa.services.transaction import write


def authorize(db: Database, actor: Actor, action: str, object_type: str, object_id: object = None) -> None:
    """Return when the actor's role may perform `action`; otherwise audit a `denied` event and raise."""
    if is_allowed(actor.role, action):
        return
    reason = f"role {actor.role!r} may not perform {action}"
    write(
        db,
        lambda session: audit.record(
            session, actor, action, object_type, object_id, outcome="denied", details={"reason": reason}
        ),
    )
    raise AccessDenied(f"{actor.name}: {reason}")
