"""The audit hash chain: canonical encoding, verification, and the anchor kept outside the database.

Each event's hash is SHA-256 over a canonical JSON encoding of all its fields, including its sequence
number and the previous event's hash. A chain inside the database alone misses truncation and a full
rewrite by someone with database access, so every event is also written to an anchor file outside the
database: an intent line before its transaction commits, a commit line after. Each anchor line carries an
HMAC under a key the database does not hold, so someone who can append to the anchor cannot forge lines.

Rows the application writes (feedback, answers, users, ...) are vouched for by the event that wrote them:
its details carry a digest of each row (`row_digest`), and verification compares the current rows with them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from medvqa.errors import MedVQAError

GENESIS_HASH = "0" * 64
ROW_DIGESTS = "row_digests"  # the details key under which an event lists the rows it wrote
INTENT, COMMIT, ABORT = "I", "C", "A"
MAC_HEX_CHARS = 32  # a 128-bit tag
MAX_DETAILS_DEPTH = 32


class AuditIntegrityError(ValueError):
    """An audit event's details are not canonical JSON (duplicate or non-string keys, NaN, other types)."""


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


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


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
    return canonical_json(body)


def compute_hash(event: ChainEvent) -> str:
    return hashlib.sha256(canonical_bytes(event)).hexdigest()


def check_details(value: Any, depth: int = 0) -> None:
    """Refuse what canonical JSON cannot carry unambiguously: keys that are not strings (1 and "1" would
    collide), NaN and infinities, and any type other than dict, list, str, int, float, bool and None."""
    if depth > MAX_DETAILS_DEPTH:
        raise AuditIntegrityError(f"audit details are nested deeper than {MAX_DETAILS_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditIntegrityError(f"audit details key {key!r} is not a string")
            check_details(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            check_details(item, depth + 1)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise AuditIntegrityError("audit details hold a number that is not finite")
    elif not (value is None or isinstance(value, str | int | bool)):
        raise AuditIntegrityError(f"audit details hold a {type(value).__name__}, which JSON cannot carry")


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicated = sorted({key for key in keys if keys.count(key) > 1})
        raise AuditIntegrityError(f"duplicate key {duplicated[0]!r} in a JSON object")
    return dict(pairs)


def _refuse_constant(name: str) -> Any:
    raise AuditIntegrityError(f"{name} is not a JSON number")


def parse_strict_json(text: str | bytes) -> Any:
    """Parse stored JSON, refusing duplicate keys and NaN/Infinity (which two readers may read differently)."""
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise AuditIntegrityError(f"not valid JSON ({exc.msg})") from None


def canonical_value(value: Any) -> Any:
    """A column value as the row digest covers it: timestamps in UTC with microseconds, dates in ISO form,
    enums by their value; JSON values as they are (canonical_json sorts their keys)."""
    if isinstance(value, datetime):
        return format_ts(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return value


def row_digest(table: str, values: Mapping[str, Any]) -> str:
    """SHA-256 over the canonical encoding of one row: every column, by name."""
    body = {"table": table, "values": {name: canonical_value(value) for name, value in values.items()}}
    return hashlib.sha256(canonical_json(body)).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Verification


@dataclass
class VerifyReport:
    """The outcome of a verification; `first_bad_seq` names where the trail stops being trustworthy."""

    ok: bool
    events: int = 0
    first_bad_seq: int | None = None
    reason: str = ""
    anchored_seq: int = 0  # the highest event the anchor records as committed
    unconfirmed_events: int = 0  # events with an intent line but no commit line (a writer stopped after commit)
    first_unconfirmed_seq: int | None = None
    unresolved_intents: int = 0  # intent lines with no event and no abort line (a writer stopped during commit)
    rows_checked: int = 0
    row_problems: list[str] = field(default_factory=list)
    schema_problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # about the deployment, not the trail (e.g. table ownership)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fail(self, seq: int | None, reason: str) -> None:
        """Record a failure; the earliest bad event wins the headline."""
        if self.ok or (seq is not None and (self.first_bad_seq is None or seq < self.first_bad_seq)):
            self.first_bad_seq, self.reason = seq, reason
        self.ok = False


@dataclass
class ChainCheck:
    """What a pass over the events found: their hashes in order and the first broken link, if any."""

    hashes: list[str] = field(default_factory=list)
    first_bad_seq: int | None = None
    reason: str = ""

    @property
    def events(self) -> int:
        return len(self.hashes)


def check_links(events: Iterable[ChainEvent]) -> ChainCheck:
    """Check events (ordered by seq) are numbered without gaps, link, and match their hashes; stop at the
    first bad one."""
    check = ChainCheck()
    prev_hash = GENESIS_HASH
    for event in events:
        expected = check.events + 1
        problem = ""
        if event.seq != expected:
            missing = "is missing (deleted)" if event.seq > expected else "is out of order or duplicated"
            check.first_bad_seq, check.reason = expected, f"event {expected} {missing}"
            return check
        if event.prev_hash != prev_hash:
            problem = "does not link to the event before it (an event was inserted, deleted or reordered)"
        elif compute_hash(event) != event.hash:
            problem = "its content does not match its hash (the row was edited)"
        if problem:
            check.first_bad_seq, check.reason = event.seq, f"event {event.seq} {problem}"
            return check
        check.hashes.append(event.hash)
        prev_hash = event.hash
    return check


@dataclass
class AnchorRecord:
    """The anchor's lines by event: intended (before commit), committed, aborted hashes."""

    intents: dict[int, set[str]] = field(default_factory=dict)
    commits: dict[int, set[str]] = field(default_factory=dict)
    aborts: dict[int, set[str]] = field(default_factory=dict)

    def add(self, kind: str, seq: int, digest: str) -> None:
        target = {INTENT: self.intents, COMMIT: self.commits, ABORT: self.aborts}[kind]
        target.setdefault(seq, set()).add(digest)

    @classmethod
    def of(cls, heads: Iterable[tuple[int, str]], kinds: Sequence[str] = (INTENT, COMMIT)) -> AnchorRecord:
        """The anchor a clean run of writers leaves for these events (intent and commit lines)."""
        record = cls()
        for seq, digest in heads:
            for kind in kinds:
                record.add(kind, seq, digest)
        return record


def check_anchor(report: VerifyReport, hashes: Sequence[str], anchor: AnchorRecord, head_now: int = 0) -> None:
    """Compare the events' hashes (seq 1..n) with the anchor, into `report`.

    Writers append an intent line before their transaction commits and a commit line after it, so:
    - an event without any line was written around medvqa (or forged): failure;
    - an event whose hash differs from a line for its seq was rewritten: failure;
    - a commit line past the database's last event means the tail was cut: failure;
    - an event with only its intent line: its writer stopped between commit and confirmation (warning);
    - an intent line with no event and no abort line: its writer stopped before or during its commit, or
      (the one case the anchor cannot decide) such an event was removed afterwards (warning).
    `head_now` is the database's last seq read after the anchor: later commit lines belong to writes that
    committed after the events were read, and are not a cut tail.
    """
    count = len(hashes)
    for seq, digest in enumerate(hashes, start=1):
        committed = anchor.commits.get(seq, set())
        intended = anchor.intents.get(seq, set())
        if committed and committed != {digest}:
            report.fail(seq, f"event {seq} differs from the anchor kept outside the database (the chain was rewritten)")
        elif not committed and digest not in intended:
            if intended:
                report.fail(seq, f"event {seq} differs from the anchor kept outside the database (it was rewritten)")
            else:
                report.fail(seq, f"event {seq} has no line in the anchor (it was written around medvqa, or forged)")
        elif not committed:
            report.unconfirmed_events += 1
            report.first_unconfirmed_seq = report.first_unconfirmed_seq or seq
    report.anchored_seq = max(anchor.commits, default=0)
    limit = max(count, head_now)
    cut = sorted(seq for seq in anchor.commits if seq > limit)
    if cut:
        report.fail(
            count + 1,
            f"the anchor records events up to {cut[-1]} but the database ends at {count} (the tail was cut)",
        )
    for seq, digests in anchor.intents.items():
        if seq <= count and hashes[seq - 1] in digests:
            digests = digests - {hashes[seq - 1]}
        pending = digests - anchor.commits.get(seq, set()) - anchor.aborts.get(seq, set())
        if pending and (seq <= count or seq > limit):
            report.unresolved_intents += len(pending)


def finish(report: VerifyReport, strict: bool) -> VerifyReport:
    """Turn the crash-window findings into warnings, or into failures under `strict`."""
    notes = []
    if report.unconfirmed_events:
        notes.append(
            (
                report.first_unconfirmed_seq,
                f"{report.unconfirmed_events} event(s) have an intent line but no commit line in the anchor, the "
                f"first is {report.first_unconfirmed_seq} (a writer stopped between its commit and the confirmation)",
            )
        )
    if report.unresolved_intents:
        notes.append(
            (
                report.events + 1,
                f"{report.unresolved_intents} intent line(s) in the anchor have no event and no abort line (a "
                "writer stopped during its commit; or, undecidable here, such an event was removed later)",
            )
        )
    for seq, note in notes:
        if strict:
            report.fail(seq, note)
        else:
            report.warnings.append(note)
    return report


def verify_chain(
    events: Iterable[ChainEvent], anchor: AnchorRecord, strict: bool = False, head_now: int = 0
) -> VerifyReport:
    """Check events link, hash and agree with the anchor (see `check_anchor`)."""
    links = check_links(events)
    report = VerifyReport(True, links.events)
    if links.first_bad_seq is not None:
        report.fail(links.first_bad_seq, links.reason)
    check_anchor(report, links.hashes, anchor, head_now)
    return finish(report, strict)


# ---------------------------------------------------------------------------------------------------------
# The anchor file and its key


class AnchorError(MedVQAError):
    """The anchor file or its key is missing or damaged, or a line is not authenticated."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


class AnchorKeys:
    """The anchor's HMAC keys: a file of `kid hexkey` lines, the last one current, readable by the
    application's account only (0600). The database never holds them."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> list[tuple[str, bytes]]:
        try:
            text = self.path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise AnchorError(f"the audit anchor key {self.path} is missing") from None
        except (OSError, UnicodeError) as exc:
            raise AnchorError(f"the audit anchor key {self.path} cannot be read ({type(exc).__name__})") from None
        keys: list[tuple[str, bytes]] = []
        for number, line in enumerate(text.splitlines(), start=1):
            parts = line.split()
            try:
                kid, key = parts[0], bytes.fromhex(parts[1])
                if len(parts) != 2 or len(key) < 32 or not kid.isalnum() or kid in dict(keys):
                    raise ValueError
            except (IndexError, ValueError):
                raise AnchorError(f"the audit anchor key {self.path} is damaged at line {number}") from None
            keys.append((kid, key))
        if not keys:
            raise AnchorError(f"the audit anchor key {self.path} holds no key")
        return keys

    def create(self) -> None:
        """Write a first key (0600), unless a key file is there already."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as handle:
            handle.write(f"k1 {secrets.token_hex(32)}\n")
            handle.flush()
            os.fsync(handle.fileno())

    def rotate(self) -> str:
        """Add a new current key; earlier keys stay for verifying the lines they signed. Returns its id."""
        keys = self.load()
        kid = f"k{len(keys) + 1}"
        text = "".join(f"{k} {v.hex()}\n" for k, v in keys) + f"{kid} {secrets.token_hex(32)}\n"
        fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".anchor-key-")
        try:
            with os.fdopen(fd, "w") as handle:  # mkstemp creates it 0600
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return kid


def _mac(key: bytes, kind: str, seq: int, digest: str, kid: str) -> str:
    message = f"medvqa-anchor-v2 {kind} {seq} {digest} {kid}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:MAC_HEX_CHARS]


class AuditAnchor:
    """Append-only text file of authenticated lines `kind seq hash kid mac`, kept outside the database.

    `kind` is I (intent, fsynced before the event's transaction commits), C (committed) or A (the commit
    failed). Appends use O_APPEND with a single write per batch, so concurrent writer processes never
    interleave inside a line. A last line cut short by a crash (or the NUL padding a filesystem may leave
    after a power loss) is ignored on reading. The key file defaults to `<anchor>.key` beside it; settings
    put it elsewhere (see compliance/audit_trail.md for who must hold it).
    """

    def __init__(self, path: Path, key_path: Path | None = None) -> None:
        self.path = path
        self.keys = AnchorKeys(key_path or path.with_name(path.name + ".key"))

    def create(self) -> None:
        """Create the (empty) anchor and its key, so that a missing file later means it was removed."""
        self._check_not_a_folder()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
        if not self.keys.exists() and self.path.stat().st_size == 0:
            self.keys.create()

    def _check_not_a_folder(self) -> None:
        if self.path.is_dir():
            raise AnchorError(f"the audit anchor {self.path} is a folder, not a file")

    def _signing_key(self) -> tuple[str, bytes]:
        """The current key; a fresh anchor (no lines yet) gets its first key here."""
        if not self.keys.exists():
            if self.path.exists() and self.path.stat().st_size > 0:
                raise AnchorError(f"the audit anchor key {self.keys.path} is missing; the anchor cannot be extended")
            self.keys.create()
        return self.keys.load()[-1]

    def append(self, heads: Iterable[tuple[int, str]], kind: str = COMMIT, durable: bool = True) -> None:
        """Append one line per (seq, hash); `durable` fsyncs before returning (intent lines must be)."""
        heads = list(heads)
        if not heads:
            return
        self._check_not_a_folder()
        kid, key = self._signing_key()
        data = "".join(f"{kind} {seq} {digest} {kid} {_mac(key, kind, seq, digest, kid)}\n" for seq, digest in heads)
        try:  # never created here: a removed anchor must not come back empty (`create` makes a new one)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            raise AnchorError(
                f"the audit anchor {self.path} is missing (`medvqa db upgrade` creates it for a new database)"
            ) from None
        try:
            os.write(fd, data.encode())
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> AnchorRecord:
        """Every authenticated line; AnchorError names the first line that is damaged, unauthenticated, or
        signed with a key older than one an earlier line used (a retired key)."""
        self._check_not_a_folder()
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise AnchorError(f"the audit anchor {self.path} is missing", 1) from None
        except OSError as exc:
            raise AnchorError(f"the audit anchor {self.path} cannot be read ({type(exc).__name__})", 1) from None
        lines = raw.rstrip(b"\x00").split(b"\n")[:-1]  # a last line without its newline was cut by a crash
        record = AnchorRecord()
        if not lines:
            return record
        keys = self.keys.load()
        order = {kid: index for index, (kid, _) in enumerate(keys)}
        newest = -1
        for number, line in enumerate(lines, start=1):
            kind, seq, digest, kid, mac = _parse_line(line, self.path, number)
            if kid not in order or not hmac.compare_digest(mac, _mac(dict(keys)[kid], kind, seq, digest, kid)):
                raise AnchorError(f"the audit anchor {self.path} line {number} is not authenticated (forged)", seq)
            if order[kid] < newest:
                raise AnchorError(f"the audit anchor {self.path} line {number} is signed with a retired key", seq)
            newest = max(newest, order[kid])
            record.add(kind, seq, digest)
        return record

    def lines(self) -> Iterator[str]:
        """The raw lines, for tests and for an auditor's own tools."""
        yield from self.path.read_text(encoding="ascii", errors="replace").rstrip("\x00").splitlines()


def _parse_line(line: bytes, path: Path, number: int) -> tuple[str, int, str, str, str]:
    parts = line.split(b" ")
    damaged = AnchorError(f"the audit anchor {path} is damaged at line {number}")
    if len(parts) != 5:
        raise damaged
    try:
        kind, seq_text, digest, kid, mac = (part.decode("ascii") for part in parts)
    except UnicodeDecodeError:
        raise damaged from None
    hexdigits = set("0123456789abcdef")
    if (
        kind not in (INTENT, COMMIT, ABORT)
        or not seq_text.isdigit()
        or len(digest) != 64
        or not set(digest) <= hexdigits
        or len(mac) != MAC_HEX_CHARS
        or not set(mac) <= hexdigits
    ):
        raise damaged
    return kind, int(seq_text), digest, kid, mac
