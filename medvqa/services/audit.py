"""Recording audit events inside a write transaction, and verifying the whole trail and the records it vouches for."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Text, cast, func, select, text
from sqlalchemy.orm import Session

from compliance.audit_chain import (
    GENESIS_HASH,
    ROW_DIGESTS,
    AnchorError,
    AuditIntegrityError,
    ChainEvent,
    VerifyReport,
    check_anchor,
    check_details,
    check_links,
    compute_hash,
    finish,
    parse_strict_json,
)
from compliance.policy import Role
from medvqa.db import AuditEvent, append_only, tracking
from medvqa.db.base import utcnow
from medvqa.db.engine import Database
from medvqa.services.transaction import PENDING_HEADS

ACTION_PATTERN = re.compile(r"^[a-z_]+:[a-z_]+:[a-z_]+$")
OUTCOMES = ("success", "denied", "failed")
# Column limits of audit_events (PostgreSQL enforces them; SQLite does not, so both are cut here alike).
LIMITS = {"actor_name": 64, "actor_role": 32, "action": 96, "object_type": 32, "object_id": 64}
MAX_DETAIL_TEXT = 2_000  # characters of one string inside details
MAX_ROW_PROBLEMS = 50  # row problems listed in a report (all are counted)


@dataclass(frozen=True)
class Actor:
    """Who acts: a signed-in user, or the local operator at the command line (user_id None)."""

    name: str
    role: str
    user_id: int | None = None


def bounded(value: str, limit: int) -> str:
    """`value` as stored in the trail: unchanged when it is printable and fits; otherwise its printable start
    with '…#' and the first 16 hex digits of its SHA-256, `limit` characters at most, so a long or hostile
    value (a 1 MB user name, a NUL byte) is never stored whole and two different values stay apart."""
    clean = "".join(ch if ch.isprintable() else "\ufffd" for ch in value)
    if clean == value and len(value) <= limit:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return clean[: max(0, limit - 18)] + "…#" + digest


def _bounded_details(value: Any) -> Any:
    if isinstance(value, str):
        return bounded(value, MAX_DETAIL_TEXT)
    if isinstance(value, dict):
        return {bounded(k, MAX_DETAIL_TEXT) if isinstance(k, str) else k: _bounded_details(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_bounded_details(v) for v in value]
    return value


def record(
    session: Session,
    actor: Actor,
    action: str,
    object_type: str,
    object_id: object | None = None,
    *,
    outcome: str = "success",
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the chain in the caller's transaction (which holds the chain lock). The event
    vouches for every tracked row the transaction wrote since its previous event (their digests go into
    details under `row_digests`)."""
    if not ACTION_PATTERN.match(action) or len(action) > LIMITS["action"]:
        raise ValueError(f"audit action {action!r} is not source:subject:action")
    if outcome not in OUTCOMES:
        raise ValueError(f"audit outcome {outcome!r} is not one of {OUTCOMES}")
    check_details(details or {})
    body: dict[str, Any] = _bounded_details(dict(details or {}))
    if ROW_DIGESTS in body:
        raise AuditIntegrityError(f"audit details key {ROW_DIGESTS!r} is reserved for the rows an event vouches for")
    touched = tracking.take_touched(session)
    if touched:
        body[ROW_DIGESTS] = tracking.row_digests(session, touched)
    head = session.execute(select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)).first()
    seq, prev_hash = (head.seq + 1, head.hash) if head else (1, GENESIS_HASH)
    chained = ChainEvent(
        seq=seq,
        ts=utcnow(),
        actor_user_id=actor.user_id,
        actor_name=bounded(actor.name, LIMITS["actor_name"]),
        actor_role=bounded(actor.role, LIMITS["actor_role"]),
        action=action,
        object_type=bounded(object_type, LIMITS["object_type"]),
        object_id=None if object_id is None else bounded(str(object_id), LIMITS["object_id"]),
        outcome=outcome,
        details=body,
        prev_hash=prev_hash,
    )
    row = AuditEvent(**{**_fields(chained), "hash": compute_hash(chained)})
    session.add(row)
    session.flush()
    session.info.setdefault(PENDING_HEADS, []).append((row.seq, row.hash))
    return row


def _fields(event: ChainEvent) -> dict[str, Any]:
    return {name: getattr(event, name) for name in ChainEvent.__dataclass_fields__ if name != "hash"}


@dataclass
class _Expectations:
    """What the events seen so far say each tracked row must be: (digest or None if deleted, seq)."""

    rows: dict[tuple[str, int], tuple[str | None, int]]
    bad_details: tuple[int, str] | None = None


def iter_events(session: Session, batch: int = 5_000, expect: _Expectations | None = None) -> Iterator[ChainEvent]:
    """Every event in seq order, streamed as plain rows (no ORM objects: verification reads 100,000s).

    Details are parsed from their stored text with duplicate keys and NaN refused; the first event whose
    details are not canonical JSON ends the stream (noted in `expect`, or raised)."""
    names = [name for name in ChainEvent.__dataclass_fields__ if name != "details"]
    columns = [AuditEvent.__table__.c[name] for name in names]
    query = select(*columns, cast(AuditEvent.__table__.c.details, Text)).order_by(AuditEvent.seq)
    for row in session.execute(query.execution_options(yield_per=batch)):
        values = dict(zip(names, row[:-1], strict=True))
        try:
            details = parse_strict_json(row[-1])
            if not isinstance(details, dict):
                raise AuditIntegrityError("details are not a JSON object")
            written = _row_digests(details)
        except AuditIntegrityError as exc:
            if expect is None:
                raise
            expect.bad_details = (values["seq"], str(exc))
            return
        if expect is not None:
            for table, key, digest in written:
                expect.rows[(table, key)] = (digest, values["seq"])
        yield ChainEvent(details=details, **values)


def _row_digests(details: dict[str, Any]) -> list[tuple[str, int, str | None]]:
    entries = details.get(ROW_DIGESTS, [])
    try:
        return [(str(t), int(k), None if d is None else str(d)) for t, k, d in entries]
    except (TypeError, ValueError):
        raise AuditIntegrityError(f"{ROW_DIGESTS} is not a list of [table, id, digest]") from None


def verify(db: Database, strict: bool = False) -> VerifyReport:
    """Check the chain, the records it vouches for, the append-only triggers, and the anchor outside the
    database. Events, rows and triggers are read in one snapshot; the anchor after it (every event committed
    in that snapshot had its intent line written before its commit), then the database's head again."""
    expect = _Expectations({})
    with db.read_session() as session, session.begin():
        if db.backend == "postgresql":
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        links = check_links(iter_events(session, expect=expect))
        report = VerifyReport(True, links.events)
        if links.first_bad_seq is not None:
            report.fail(links.first_bad_seq, links.reason)
        if expect.bad_details is not None:
            seq, why = expect.bad_details
            report.fail(seq, f"event {seq} details are not canonical JSON: {why}")
        if report.ok:
            _check_rows(session, expect, report)
        connection = session.connection()
        report.schema_problems = append_only.problems(connection) + _role_problems(session)
        owner = append_only.owner_warning(connection)
    if report.schema_problems:
        report.fail(None, report.schema_problems[0])
    try:
        anchor = db.anchor.read()
    except AnchorError as exc:
        report.fail(exc.seq or 1, str(exc))
        return report
    with db.read_session() as session:
        head_now = session.scalar(select(func.coalesce(func.max(AuditEvent.seq), 0))) or 0
    check_anchor(report, links.hashes, anchor, head_now)
    finish(report, strict)
    if owner:
        report.notes.append(owner)
    return report


def _check_rows(session: Session, expect: _Expectations, report: VerifyReport) -> None:
    """Every current row of a tracked table against the latest event that wrote it."""
    problems: list[str] = []
    for name in tracking.TRACKED_TABLES:
        for key, digest in tracking.table_digests(session, name):
            report.rows_checked += 1
            wanted = expect.rows.pop((name, key), None)
            if wanted is None:
                problems.append(f"{name} {key} has no audit event that wrote it (inserted around medvqa)")
            elif wanted[0] is None:
                problems.append(f"{name} {key} exists though event {wanted[1]} recorded its deletion")
            elif wanted[0] != digest:
                problems.append(f"{name} {key} was changed after event {wanted[1]} wrote it")
    for (name, key), (written, seq) in sorted(expect.rows.items()):
        if written is not None:
            problems.append(f"{name} {key} was deleted outside medvqa (event {seq} wrote it)")
    if problems:
        report.row_problems = problems[:MAX_ROW_PROBLEMS]
        report.fail(None, f"{len(problems)} record(s) do not match the audit trail: {problems[0]}")


def _role_problems(session: Session) -> list[str]:
    """The roles table is seeded once and never changes: ids and names must be the policy's, in its order."""
    found = [tuple(row) for row in session.execute(text("SELECT id, name FROM roles ORDER BY id"))]
    expected = [(index, role.value) for index, role in enumerate(Role, start=1)]
    return [] if found == expected else ["the roles table differs from the seeded roles (a role was renamed or added)"]
