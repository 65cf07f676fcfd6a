"""Adapters as the ML engineer and the admin see them: status, data snapshot, metrics; promotion by two
people (an ML engineer requests, an admin approves) and one-step rollback.

A promotion request has no table of its own: it is the audit event `model:adapter:request_promotion` on the
adapter, answered by an approval event. The adapter's status column changes only on approval or rollback.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from compliance.policy import Action
from medvqa.db import Adapter, AdapterStatus, AuditEvent, Dataset, TrainingRound
from medvqa.db.base import utcnow
from medvqa.db.engine import Database
from medvqa.errors import AccessDenied, InvalidInput, NotFound
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.transaction import write

COMPARED_METRIC = "overall_accuracy"


def list_adapters(db: Database, actor: Actor) -> list[dict[str, Any]]:
    """Every adapter, newest first, with its training data snapshot, metrics and any pending request."""
    authorize(db, actor, Action.ADAPTER_READ, "adapter")
    with db.read_session() as session:
        rows = session.execute(
            select(Adapter, Dataset)
            .outerjoin(TrainingRound, TrainingRound.id == Adapter.round_id)
            .outerjoin(Dataset, Dataset.id == TrainingRound.dataset_id)
            .order_by(Adapter.id.desc())
        ).all()
        pending = {row.id: _pending_request(session, row.id) for row, _ in rows}
    return [
        {
            "id": adapter.id,
            "name": adapter.name,
            "status": adapter.status.value,
            "sha256": adapter.sha256,
            "base_model": adapter.base_model_ref,
            "snapshot": f"{dataset.name} ({dataset.item_count} items, {dataset.content_sha256[:12]})"
            if dataset
            else "",
            "metrics": adapter.metrics,
            "promoted_at": adapter.promoted_at.isoformat() if adapter.promoted_at else None,
            "requested_by": (pending[adapter.id] or {}).get("actor_name"),
        }
        for adapter, dataset in rows
    ]


def _pending_request(session: Session, adapter_id: int) -> dict[str, Any] | None:
    """The latest successful request for this adapter when no approval or rollback came after it."""
    actions = [Action.ADAPTER_PROMOTE_REQUEST, Action.ADAPTER_PROMOTE_APPROVE]
    last = session.scalars(
        select(AuditEvent)
        .where(
            AuditEvent.object_type == "adapter",
            AuditEvent.object_id == str(adapter_id),
            AuditEvent.action.in_([str(a) for a in actions]),
            AuditEvent.outcome == "success",
        )
        .order_by(AuditEvent.seq.desc())
        .limit(1)
    ).first()
    if last is None or last.action != Action.ADAPTER_PROMOTE_REQUEST:
        return None
    return {"actor_user_id": last.actor_user_id, "actor_name": last.actor_name, "seq": last.seq}


def gate_refusal(metrics: dict[str, Any]) -> str | None:
    """Why the promotion gate forbids promoting an adapter with these metrics; None when its round passed.

    The gate decision is made when a fine-tuning round evaluates the candidate (medvqa.training.compare) and
    stored in the adapter's metrics; an adapter without one (not made by a round) cannot be promoted.
    """
    gate = metrics.get("gate")
    if not isinstance(gate, dict):
        return "it has no gate decision (not made by a round)"
    if gate.get("passed") is not True:
        return "; ".join(str(reason) for reason in gate.get("reasons", [])) or "the gate failed"
    return None


def request_promotion(db: Database, actor: Actor, adapter_id: int, reason: str) -> None:
    """An ML engineer asks for a candidate that passed the promotion gate to go live; an admin must approve it.

    A candidate that failed the gate (or has none) is refused, and the refusal is audited.
    """
    authorize(db, actor, Action.ADAPTER_PROMOTE_REQUEST, "adapter", adapter_id)
    if not reason.strip():
        raise InvalidInput("a promotion request needs a reason (e.g. the evaluation that supports it)")
    with db.read_session() as session:
        refusal = gate_refusal(_adapter(session, adapter_id).metrics or {})
    if refusal is not None:
        details = {"reason": f"promotion gate: {refusal}"}
        write(
            db,
            lambda s: audit.record(
                s, actor, Action.ADAPTER_PROMOTE_REQUEST, "adapter", adapter_id, outcome="failed", details=details
            ),
        )
        raise InvalidInput(f"adapter {adapter_id} may not be promoted: the promotion gate failed ({refusal})")

    def work(session: Session) -> None:
        adapter = _adapter(session, adapter_id)
        if adapter.status != AdapterStatus.CANDIDATE:
            raise InvalidInput(f"adapter {adapter_id} is {adapter.status.value}; only a candidate can be promoted")
        if _pending_request(session, adapter_id) is not None:
            raise InvalidInput(f"adapter {adapter_id} already has a promotion request waiting for approval")
        details = {"reason": reason.strip(), "sha256": adapter.sha256}
        audit.record(session, actor, Action.ADAPTER_PROMOTE_REQUEST, "adapter", adapter_id, details=details)

    write(db, work)


def approve_promotion(db: Database, actor: Actor, adapter_id: int) -> None:
    """An admin approves a pending request made by someone else: the adapter goes live, the live one retires."""
    authorize(db, actor, Action.ADAPTER_PROMOTE_APPROVE, "adapter", adapter_id)

    def work(session: Session) -> None:
        adapter = _adapter(session, adapter_id)
        request = _pending_request(session, adapter_id)
        if request is None or adapter.status != AdapterStatus.CANDIDATE:
            raise InvalidInput(f"adapter {adapter_id} has no promotion request waiting for approval")
        if request["actor_user_id"] == actor.user_id:
            raise AccessDenied("a promotion needs two people: the requester cannot approve it")
        previous = _live(session)
        if previous is not None:
            previous.status = AdapterStatus.RETIRED
        adapter.status, adapter.promoted_at = AdapterStatus.LIVE, utcnow()
        details = {
            "requested_by": request["actor_name"],
            "request_seq": request["seq"],
            "previous_live": previous.id if previous else None,
            "sha256": adapter.sha256,
        }
        audit.record(session, actor, Action.ADAPTER_PROMOTE_APPROVE, "adapter", adapter_id, details=details)

    write(db, work)


def rollback(db: Database, actor: Actor, reason: str) -> int | None:
    """Retire the live adapter and bring back the one that was live before it was approved (None: the bare base
    model). Repeated rollbacks walk back through the approvals, like an undo stack."""
    authorize(db, actor, Action.ADAPTER_ROLLBACK, "adapter")
    if not reason.strip():
        raise InvalidInput("a rollback needs a reason")

    def work(session: Session) -> int | None:
        current = _live(session)
        if current is None:
            raise InvalidInput("no adapter is live; there is nothing to roll back")
        earlier = _predecessor(session, current.id)
        current.status = AdapterStatus.RETIRED
        if earlier is not None:
            earlier.status = AdapterStatus.LIVE
        restored = earlier.id if earlier else None
        details = {"reason": reason.strip(), "retired": current.id, "restored": restored}
        audit.record(session, actor, Action.ADAPTER_ROLLBACK, "adapter", current.id, details=details)
        return restored

    return write(db, work)


def _predecessor(session: Session, adapter_id: int) -> Adapter | None:
    """The adapter that was live when `adapter_id` was last approved, as its approval event recorded."""
    approval = session.scalars(
        select(AuditEvent)
        .where(
            AuditEvent.action == str(Action.ADAPTER_PROMOTE_APPROVE),
            AuditEvent.object_type == "adapter",
            AuditEvent.object_id == str(adapter_id),
            AuditEvent.outcome == "success",
        )
        .order_by(AuditEvent.seq.desc())
        .limit(1)
    ).first()
    previous = approval.details.get("previous_live") if approval else None
    return session.get(Adapter, int(previous)) if previous is not None else None


def _adapter(session: Session, adapter_id: int) -> Adapter:
    adapter = session.get(Adapter, adapter_id)
    if adapter is None:
        raise NotFound(f"adapter {adapter_id} does not exist")
    return adapter


def _live(session: Session) -> Adapter | None:
    return session.scalars(select(Adapter).where(Adapter.status == AdapterStatus.LIVE)).first()


def compare_metrics(candidate: dict[str, Any], live: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Rows (group, subgroup, adapter, value) of the compared metric per question type and organ, for a chart."""
    rows = []
    for label, metrics in (("candidate", candidate), ("live", live or {})):
        for group in ("by_question_type", "by_organ"):
            for subgroup, figures in (metrics.get(group) or {}).items():
                value = figures.get(COMPARED_METRIC) if isinstance(figures, dict) else None
                if value is not None:
                    rows.append(
                        {"group": group.removeprefix("by_"), "subgroup": subgroup, "adapter": label, "value": value}
                    )
    return rows
