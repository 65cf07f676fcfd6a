"""The audit hash chain: canonical encoding, verification, and the anchor kept outside the database.

Each event's hash is SHA-256 over a canonical JSON encoding of all its fields, including its sequence
number and the previous event's hash. A chain inside the database alone misses truncation and a full
rewrite by someone with database access, so every committed head is also appended to an anchor file
(ideally on storage the database admins cannot rewrite); verification checks the database against it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GENESIS_HASH = "0" * 64


@dataclass(frozen=True)
class ChainEvent:
    """One audit event as the chain sees it (the database row's fields)."""

    seq: int
    ts: datetime
    actor_user_id: int | None
    actor_name: str
    actor_role: str
    action: str
    object_type: str
    object_id: str | None
    outcome: str
    details: Mapping[str, Any]
    prev_hash: str
    hash: str = ""


def format_ts(ts: datetime) -> str:
    """UTC, microseconds, 'Z': the one spelling of a timestamp the hash covers (naive means UTC)."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_bytes(event: ChainEvent) -> bytes:
    body = {
        "seq": event.seq,
        "ts": format_ts(event.ts),
        "actor_user_id": event.actor_user_id,
        "actor_name": event.actor_name,
        "actor_role": event.actor_role,
        "action": event.action,
        "object_type": event.object_type,
        "object_id": event.object_id,
        "outcome": event.outcome,
        "details": event.details,
        "prev_hash": event.prev_hash,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def compute_hash(event: ChainEvent) -> str:
    return hashlib.sha256(canonical_bytes(event)).hexdigest()


@dataclass
class VerifyReport:
    """The outcome of a verification; `first_bad_seq` names where the trail stops being trustworthy."""

    ok: bool
    events: int = 0
    first_bad_seq: int | None = None
    reason: str = ""
    anchored_seq: int = 0
    unanchored_events: int = 0
    first_unanchored_seq: int | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _row_problem(event: ChainEvent, prev_hash: str, anchored: set[str] | None) -> str:
    if event.prev_hash != prev_hash:
        return "does not link to the event before it (an event was inserted, deleted or reordered)"
    if compute_hash(event) != event.hash:
        return "its content does not match its hash (the row was edited)"
    if anchored is not None and anchored != {event.hash}:
        return "differs from the anchor kept outside the database (the chain was rewritten)"
    return ""


def verify_chain(events: Iterable[ChainEvent], anchor: Mapping[int, set[str]], strict: bool = False) -> VerifyReport:
    """Check events (ordered by seq) link, hash and agree with the anchor; stop at the first bad one.

    An event with no anchor line is a warning by default: a writer killed between its commit and its
    anchor append leaves one. It is also what an event forged at the end of the chain becomes once a
    later write anchors a newer head, so `strict` makes any unanchored event a failure.
    """
    expected, prev_hash = 1, GENESIS_HASH
    unanchored, first_unanchored = 0, None
    for event in events:
        if event.seq != expected:
            missing = "is missing (deleted)" if event.seq > expected else "is out of order or duplicated"
            return VerifyReport(False, expected - 1, expected, f"event {expected} {missing}")
        anchored = anchor.get(event.seq)
        problem = _row_problem(event, prev_hash, anchored)
        if problem:
            return VerifyReport(False, expected - 1, event.seq, f"event {event.seq} {problem}")
        if anchored is None:
            unanchored += 1
            first_unanchored = first_unanchored or event.seq
        prev_hash, expected = event.hash, expected + 1
    count = expected - 1
    anchored_seq = max(anchor, default=0)
    if anchored_seq > count:
        return VerifyReport(
            False,
            count,
            count + 1,
            f"the anchor records events up to {anchored_seq} but the database ends at {count} (the tail was cut)",
        )
    report = VerifyReport(True, count, None, "", anchored_seq, unanchored, first_unanchored)
    if unanchored:
        note = (
            f"{unanchored} event(s) have no anchor line, the first is {first_unanchored} "
            "(a writer stopped between commit and anchor append, or the event was forged)"
        )
        if strict:
            report.ok, report.first_bad_seq, report.reason = False, first_unanchored, note
        else:
            report.warnings.append(note)
    return report


class AnchorError(Exception):
    """The anchor file is missing or damaged."""


class AuditAnchor:
    """Append-only text file of `seq hash` lines, one per committed audit event.

    Appends use O_APPEND with a single write per batch, so concurrent writer processes never interleave
    inside a line, and are fsynced like the database commit before them. A last line cut short by a crash
    (or the NUL padding a filesystem may leave after a power loss) is ignored on reading.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def create(self) -> None:
        """Create the (empty) anchor, so that a missing file later means it was removed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch(exist_ok=True)

    def append(self, heads: Iterable[tuple[int, str]]) -> None:
        data = "".join(f"{seq} {digest}\n" for seq, digest in heads).encode()
        if not data:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> dict[int, set[str]]:
        """seq -> the hashes recorded for it (more than one means the chain was rewritten)."""
        if not self.path.exists():
            raise AnchorError(f"the audit anchor {self.path} is missing")
        text = self.path.read_text(encoding="ascii", errors="replace").rstrip("\x00")
        complete_lines = text.split("\n")[:-1]  # a last line without its newline was cut by a crash
        anchor: dict[int, set[str]] = {}
        for number, line in enumerate(complete_lines, start=1):
            parts = line.split(" ")
            if len(parts) != 2 or not parts[0].isdigit() or len(parts[1]) != 64:
                raise AnchorError(f"the audit anchor {self.path} is damaged at line {number}")
            anchor.setdefault(int(parts[0]), set()).add(parts[1])
        return anchor
