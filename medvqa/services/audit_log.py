"""The audit trail as the auditor reads it: filtered listing, CSV export, and the chain check, each recorded."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, TextIO

from sqlalchemy import RowMapping, Select, select

from compliance.audit_chain import VerifyReport
from compliance.policy import Action
from medvqa.db import AuditEvent
from medvqa.db.engine import Database
from medvqa.errors import DatabaseError, InvalidInput
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.transaction import write

CSV_COLUMNS = (
    "seq",
    "ts",
    "actor_user_id",
    "actor_name",
    "actor_role",
    "action",
    "object_type",
    "object_id",
    "outcome",
    "details",
    "prev_hash",
    "hash",
)


@dataclass(frozen=True)
class AuditFilter:
    """Empty fields match everything; times are inclusive and must carry a time zone."""

    user: str = ""  # actor name
    action: str = ""
    object_type: str = ""
    object_id: str = ""
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        for moment in (self.since, self.until):
            if moment is not None and moment.tzinfo is None:
                raise InvalidInput("audit filter times need a time zone (the trail is kept in UTC)")
        if self.since and self.until and self.since > self.until:
            raise InvalidInput("the filter's start is after its end")

    def apply(self, query: Select[Any]) -> Select[Any]:
        for column, value in (
            (AuditEvent.actor_name, self.user),
            (AuditEvent.action, self.action),
            (AuditEvent.object_type, self.object_type),
            (AuditEvent.object_id, self.object_id),
        ):
            if value.strip():
                query = query.where(column == value.strip())
        if self.since is not None:
            query = query.where(AuditEvent.ts >= self.since)
        if self.until is not None:
            query = query.where(AuditEvent.ts <= self.until)
        return query


def list_events(
    db: Database, actor: Actor, search: AuditFilter = AuditFilter(), limit: int = 500
) -> list[dict[str, Any]]:
    """The newest `limit` matching events, newest first."""
    authorize(db, actor, Action.AUDIT_READ, "audit")
    query = search.apply(select(AuditEvent)).order_by(AuditEvent.seq.desc()).limit(limit)
    with db.read_session() as session:
        return [_row(event) for event in session.scalars(query)]


def filter_choices(db: Database, actor: Actor) -> dict[str, list[str]]:
    """Distinct users, actions and object types in the trail, for the filter pickers."""
    authorize(db, actor, Action.AUDIT_READ, "audit")
    with db.read_session() as session:
        return {
            name: sorted(v for v in session.scalars(select(column).distinct()) if v)
            for name, column in (
                ("user", AuditEvent.actor_name),
                ("action", AuditEvent.action),
                ("object_type", AuditEvent.object_type),
            )
        }


def export_csv(db: Database, actor: Actor, search: AuditFilter = AuditFilter(), *, raw: bool = False) -> str:
    """Every matching event in seq order as CSV text (see `write_csv`)."""
    buffer = io.StringIO()
    write_csv(db, actor, buffer, search, raw=raw)
    return buffer.getvalue()


def write_csv(
    db: Database, actor: Actor, out: TextIO, search: AuditFilter = AuditFilter(), *, raw: bool = False
) -> int:
    """Write every matching event in seq order as CSV (hashes included) to `out`, streamed: there is no row
    limit. The export itself is recorded in the trail, with its filter, row count and form.

    By default a cell that a spreadsheet would run as a formula (starting with = + - @ or a tab or carriage
    return) gets a leading apostrophe (OWASP's CSV-injection advice). `raw=True` writes the stored values
    unchanged, for re-computing the hashes; such a file must not be opened in a spreadsheet.
    """
    authorize(db, actor, Action.AUDIT_EXPORT, "audit")
    query = search.apply(select(AuditEvent.__table__)).order_by(AuditEvent.seq).execution_options(yield_per=2_000)
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    count = 0
    with db.read_session() as session, session.begin():
        for event in session.execute(query).mappings():  # plain rows: memory stays flat over millions
            row = _row(event)
            writer.writerow(row if raw else {name: _defuse(value) for name, value in row.items()})
            count += 1
    details = {
        "rows": count,
        "filter": {k: str(v) for k, v in asdict(search).items() if v},
        "form": "raw" if raw else "spreadsheet-safe",
    }
    write(db, lambda s: audit.record(s, actor, Action.AUDIT_EXPORT, "audit", None, details=details))
    return count


def verify_trail(db: Database, actor: Actor, strict: bool = False) -> VerifyReport:
    """Run the chain check and record that it ran, and what it found."""
    authorize(db, actor, Action.AUDIT_VERIFY, "audit")
    report = audit.verify(db, strict)
    summary = {"ok": report.ok, "events": report.events, "first_bad_seq": report.first_bad_seq}
    outcome = "success" if report.ok else "failed"
    try:
        write(
            db, lambda s: audit.record(s, actor, Action.AUDIT_VERIFY, "audit", None, outcome=outcome, details=summary)
        )
    except DatabaseError as exc:  # e.g. the anchor is gone: the finding matters more than recording it
        if report.ok:  # a broken trail already says why in its headline
            report.warnings.append(f"this verification could not be recorded in the trail: {exc}")
    return report


def rotate_anchor_key(db: Database, actor: Actor) -> str:
    """Sign anchor lines with a new key from now on; the rotation is audited (the key itself never is)."""
    authorize(db, actor, Action.AUDIT_ROTATE_KEY, "audit")
    kid = db.anchor.keys.rotate()
    write(db, lambda s: audit.record(s, actor, Action.AUDIT_ROTATE_KEY, "audit", None, details={"key_id": kid}))
    return kid


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _defuse(value: Any) -> Any:
    """The cell with a leading apostrophe when a spreadsheet would read it as a formula."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def _row(event: AuditEvent | RowMapping) -> dict[str, Any]:
    values = event if isinstance(event, RowMapping) else {name: getattr(event, name) for name in CSV_COLUMNS}
    row = {name: values[name] for name in CSV_COLUMNS}
    row["ts"] = values["ts"].isoformat()
    row["details"] = json.dumps(values["details"], sort_keys=True)
    return row
