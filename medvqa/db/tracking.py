"""Which rows a transaction wrote, so that its audit event can vouch for them.

A session listener notes every row of a tracked table that a flush inserts, updates or deletes. The audit
event recorded next in the same transaction takes them (`take_touched`) and carries a digest of each row as
the database now holds it (`row_digests`); `medvqa audit verify` recomputes the digests of the current rows
(`table_digests`) and compares. `services.transaction.write` refuses to commit a tracked row that no event
vouches for (`UnauditedWrite`): that is a bug, not a user error. A write around the services (a session of
its own, plain SQL) is not refused here; verify reports its rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import Table, event, inspect, select
from sqlalchemy.orm import Session, sessionmaker

from compliance.audit_chain import row_digest
from medvqa.db.base import Base

# The records the audit trail vouches for. Not here: audit_events (the chain itself), roles (fixed, checked
# against the policy), sessions and sign_in_attempts (operational state; sign-ins are audited as events).
TRACKED_TABLES = (
    "users",
    "studies",
    "series",
    "instances",
    "questions",
    "answers",
    "feedback",
    "reviews",
    "datasets",
    "training_rounds",
    "adapters",
    "model_validations",
    "answer_heatmaps",
)
# Columns added after rows could exist: a row digest leaves them out while they are NULL, so rows written
# before the migration that added them still verify (a value set later is covered like any other column).
LATER_COLUMNS = {"answers": frozenset({"raw_confidence", "calibration", "abstained"})}
TOUCHED = "medvqa_touched_rows"
CHUNK = 500


class UnauditedWrite(RuntimeError):
    """A transaction wrote a tracked row and recorded no audit event after it."""


def table(name: str) -> Table:
    found = Base.metadata.tables[name]
    assert isinstance(found, Table)
    return found


def install(factory: sessionmaker[Session]) -> None:
    """Track the rows the sessions of `factory` write."""
    event.listen(factory, "after_flush", _note_flushed_rows)


def _note_flushed_rows(session: Session, _context: Any) -> None:
    touched: dict[tuple[str, int], bool] = session.info.setdefault(TOUCHED, {})
    for deleted, objects in ((False, session.new), (False, session.dirty), (True, session.deleted)):
        for obj in objects:
            name = getattr(getattr(obj, "__table__", None), "name", None)
            if name in TRACKED_TABLES:
                (key,) = inspect(obj).mapper.primary_key_from_instance(obj)
                touched[(name, int(key))] = deleted


def check_all_audited(session: Session) -> None:
    touched = session.info.get(TOUCHED)
    if touched:
        names = ", ".join(f"{name} {key}" for name, key in sorted(touched)[:5])
        raise UnauditedWrite(f"the transaction wrote {names} without an audit event vouching for them")


def take_touched(session: Session) -> dict[tuple[str, int], bool]:
    """The rows written since the last call (flushing pending changes first); the caller vouches for them."""
    session.flush()
    taken: dict[tuple[str, int], bool] = session.info.pop(TOUCHED, {})
    return taken


def row_digests(session: Session, touched: dict[tuple[str, int], bool]) -> list[list[Any]]:
    """[table, id, digest] per touched row as the database holds it now; digest None for a deleted row."""
    by_table: dict[str, list[int]] = {}
    for (name, key), deleted in touched.items():
        if not deleted:
            by_table.setdefault(name, []).append(key)
    found: dict[tuple[str, int], str] = {}
    for name, keys in by_table.items():
        for start in range(0, len(keys), CHUNK):
            found.update(((name, k), d) for k, d in _digests(session, name, keys[start : start + CHUNK]))
    return [[name, key, found.get((name, key))] for name, key in sorted(touched)]


def _digests(session: Session, name: str, keys: Iterable[int] | None) -> Iterator[tuple[int, str]]:
    tracked = table(name)
    (pk,) = tracked.primary_key.columns
    query = select(tracked).order_by(pk)
    # A whole table is streamed (a server-side cursor on PostgreSQL, too slow for a handful of rows).
    query = query.where(pk.in_(list(keys))) if keys is not None else query.execution_options(yield_per=2_000)
    later = LATER_COLUMNS.get(name, frozenset())
    for row in session.execute(query).mappings():
        values = {key: value for key, value in row.items() if value is not None or key not in later}
        yield int(row[pk.name]), row_digest(name, values)


def table_digests(session: Session, name: str) -> Iterator[tuple[int, str]]:
    """(id, digest) of every row of a tracked table, in id order, streamed."""
    return _digests(session, name, None)
