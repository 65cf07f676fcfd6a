"""What the audit trail costs: audited writes per second against plain inserts, and `audit verify` time
against just reading the events, on SQLite and on PostgreSQL.

    .venv/bin/python bench/audit_bench.py [--postgres URL | --no-postgres] [--writes N] [--events N]
                                          [--threads N]

SQLite runs on a temporary file. PostgreSQL runs in a scratch database `medvqa_bench_<pid>` created on the
server given by --postgres (default postgresql://127.0.0.1:5432/test) and dropped afterwards. Progress goes
to stderr; the result tables (markdown) go to stdout.

Writes: `give_feedback` (authorize, idempotency lookup, insert, audit event, chain lock, anchor append after
commit), one writer and `--threads` writer threads each with its own Database, against the baseline of the
same Feedback row inserted plainly in its own transaction on the same engine (on SQLite also BEGIN
IMMEDIATE; on PostgreSQL without the advisory lock).

Verify: --events feedback rows are bulk inserted, then a chain of --events valid events, each vouching for
one of those rows (its digest, as an audited write records it), is computed with
compliance.audit_chain.compute_hash and bulk inserted in one transaction, and the anchor's intent and commit
lines written; then medvqa.services.audit.verify (chain, anchor, every record, triggers) is timed, against
the baselines of reading every event and every feedback row (Core SELECTs of all columns, iterated) and of
loading every event as verify does (iter_events) without checking anything.
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert, select, text
from sqlalchemy.engine import URL

from compliance.audit_chain import COMMIT, GENESIS_HASH, INTENT, ROW_DIGESTS, AuditAnchor, ChainEvent, compute_hash
from compliance.policy import Action
from medvqa.config import normalize_database_url
from medvqa.db import AuditEvent, Feedback, Study, Verdict
from medvqa.db.base import utcnow
from medvqa.db.engine import Database, build_engine
from medvqa.db.migrate import upgrade
from medvqa.db.tracking import table_digests
from medvqa.services import audit
from medvqa.services.answers import AnswerRecord, record_answer
from medvqa.services.audit import Actor, iter_events, verify
from medvqa.services.feedback import FeedbackInput, give_feedback
from medvqa.services.transaction import write
from medvqa.services.users import add_user

OPERATOR = Actor(name="cli:bench", role="admin")
INSERT_BATCH = 10_000
WARM_UP_WRITES = 10


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Target:
    """One backend under test: where its database lives and how to open another connection to it."""

    backend: str
    url: URL
    anchor_path: Path

    def open(self) -> Database:
        return Database(build_engine(self.url), AuditAnchor(self.anchor_path))


@dataclass
class WriteResult:
    mode: str
    writers: int
    writes: int
    audited_s: float
    baseline_s: float

    @property
    def audited_per_s(self) -> float:
        return self.writes / self.audited_s

    @property
    def baseline_per_s(self) -> float:
        return self.writes / self.baseline_s


@dataclass
class VerifyResult:
    events: int
    rows: int
    build_s: float
    verify_s: float
    read_s: float
    orm_read_s: float
    db_bytes: int | None


@contextmanager
def sqlite_target(folder: Path) -> Iterator[Target]:
    yield Target("sqlite", normalize_database_url(f"sqlite:///{folder / 'bench.db'}"), folder / "anchor-sqlite.log")


@contextmanager
def postgres_target(server_url: str, folder: Path) -> Iterator[Target]:
    server = normalize_database_url(server_url)
    name = f"medvqa_bench_{os.getpid()}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        log(f"postgresql: scratch database {name} on {server.render_as_string(hide_password=True)}")
        yield Target("postgresql", server.set(database=name), folder / "anchor-postgresql.log")
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        log(f"postgresql: dropped {name}")


def timed(work: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


# --- verify ------------------------------------------------------------------------------------------------


def insert_feedback_rows(db: Database, fixture: Fixture, rows: int) -> list[tuple[int, str]]:
    """`rows` feedback rows inserted in bulk; their (id, digest) as the database holds them."""
    created = utcnow()
    with db.session() as session, session.begin():
        first = session.scalar(select(text("coalesce(max(id), 0)")).select_from(Feedback.__table__)) or 0
        batch: list[dict[str, Any]] = []
        for number in range(rows):
            batch.append(
                {
                    "answer_id": fixture.answer_id,
                    "author_id": fixture.actor.user_id,
                    "verdict": Verdict.CORRECT,
                    "comment": f"bench note {number}",
                    "idempotency_key": f"bench-{number}",
                    "body_sha256": "b" * 64,
                    "version": 1,
                    "created_at": created,
                }
            )
            if len(batch) == INSERT_BATCH:
                session.execute(insert(Feedback), batch)
                batch = []
        if batch:
            session.execute(insert(Feedback), batch)
    with db.read_session() as session, session.begin():
        return [(key, digest) for key, digest in table_digests(session, "feedback") if key > first]


def build_chain(db: Database, fixture: Fixture, events: int) -> None:
    """`events` valid chained events after the current head, each vouching for one new feedback row, bulk
    inserted in one transaction, with their intent and commit lines in the anchor."""
    rows = insert_feedback_rows(db, fixture, events)
    with db.read_session() as session:
        head = session.execute(select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)).first()
    first, prev_hash = (head.seq + 1, head.hash) if head else (1, GENESIS_HASH)
    start_ts = datetime.now(UTC) - timedelta(days=30)
    heads: list[tuple[int, str]] = []
    with db.session() as session, session.begin():
        batch: list[dict[str, Any]] = []
        for seq, (row_id, digest) in zip(range(first, first + events), rows, strict=True):
            event = ChainEvent(
                seq=seq,
                ts=start_ts + timedelta(milliseconds=seq),
                actor_user_id=fixture.actor.user_id,
                actor_name=fixture.actor.name,
                actor_role=fixture.actor.role,
                action="answer:feedback:create",
                object_type="feedback",
                object_id=str(row_id),
                outcome="success",
                details={
                    "answer_id": fixture.answer_id,
                    "version": 1,
                    "old": None,
                    "new": {"verdict": "correct", "correction": None, "comment": f"bench note {seq}"},
                    "reason": None,
                    ROW_DIGESTS: [["feedback", row_id, digest]],
                },
                prev_hash=prev_hash,
            )
            event_hash = compute_hash(event)
            batch.append(
                {**{name: getattr(event, name) for name in ChainEvent.__dataclass_fields__}, "hash": event_hash}
            )
            heads.append((seq, event_hash))
            prev_hash = event_hash
            if len(batch) == INSERT_BATCH:
                session.execute(insert(AuditEvent), batch)
                batch = []
        if batch:
            session.execute(insert(AuditEvent), batch)
    db.anchor.append(heads, INTENT)
    db.anchor.append(heads, COMMIT)


def read_all_rows(db: Database) -> int:
    """Baseline: fetch every column of every event and every feedback row in order and iterate; no checks."""
    count = 0
    with db.read_session() as session, session.begin():
        for table, key in ((AuditEvent.__table__, AuditEvent.seq), (Feedback.__table__, Feedback.id)):
            for _row in session.execute(select(table).order_by(key)).yield_per(2_000):
                count += 1
    return count


def orm_read_all(db: Database) -> int:
    """Loading every event the way verify does (iter_events), without hashing or comparing."""
    with db.read_session() as session, session.begin():
        return sum(1 for _ in iter_events(session))


def database_size(db: Database) -> int | None:
    with db.read_session() as session:
        if db.backend == "postgresql":
            return int(session.scalar(text("SELECT pg_database_size(current_database())")))
        path = db.engine.url.database
        return os.path.getsize(path) if path else None


def bench_verify(target: Target, events: int) -> VerifyResult:
    db = target.open()
    try:
        fixture = make_fixture(db)
        log(f"{target.backend}: building a chain of {events:,} events and {events:,} feedback rows")
        build_s, _ = timed(lambda: build_chain(db, fixture, events))
        log(f"{target.backend}:   built in {build_s:.1f} s; timing verify")
        verify_s, report = timed(lambda: verify(db, strict=True))
        if not report.ok or report.events < events or report.rows_checked < events:
            raise SystemExit(f"{target.backend}: the benchmark chain did not verify: {report}")
        read_s, rows = timed(lambda: read_all_rows(db))
        orm_read_s, loaded = timed(lambda: orm_read_all(db))
        assert rows >= 2 * events and loaded == report.events, (rows, loaded, events)
        log(f"{target.backend}:   verify {verify_s:.2f} s, read {read_s:.2f} s, ORM read {orm_read_s:.2f} s")
        return VerifyResult(events, report.rows_checked, build_s, verify_s, read_s, orm_read_s, database_size(db))
    finally:
        db.dispose()


# --- writes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixture:
    actor: Actor
    answer_id: int


def make_fixture(db: Database) -> Fixture:
    user = add_user(db, OPERATOR, f"benchclinician{time.time_ns()}", "correct horse battery staple", "clinician")
    actor = Actor(name=user.username, role="clinician", user_id=user.id)

    def study(session: Any) -> int:
        row = Study(study_uid=f"2.25.{os.getpid()}{time.time_ns()}", patient_pseudonym="anon-1", modality="CT")
        session.add(row)
        session.flush()
        audit.record(session, OPERATOR, Action.STUDY_IMPORT, "study", row.id)
        return row.id

    study_id = write(db, study)
    record = AnswerRecord(
        text="yes",
        model_ref="bench-model@" + "0" * 12,
        prompt_version="vqa-v1",
        preprocess_hash="a" * 64,
        backend="transformers",
        latency_ms=12.5,
    )
    answer = record_answer(db, actor, study_id, "Is there a fracture?", record)
    return Fixture(actor, answer.id)


def _item(fixture: Fixture, key: str) -> FeedbackInput:
    return FeedbackInput(fixture.answer_id, "correct", key, comment="bench note")


def audited_write(db: Database, fixture: Fixture, key: str) -> None:
    result = give_feedback(db, fixture.actor, _item(fixture, key))
    assert result.created


def plain_write(db: Database, fixture: Fixture, key: str) -> None:
    item = _item(fixture, key)
    row = Feedback(
        answer_id=item.answer_id,
        author_id=fixture.actor.user_id,
        verdict=Verdict(item.verdict),
        correction=item.correction,
        comment=item.comment,
        idempotency_key=key,
        body_sha256=item.body_sha256(fixture.actor),
        supersedes_id=None,
        reason=None,
        version=1,
    )
    with db.session() as session, session.begin():
        session.add(row)


def run_writers(
    target: Target, fixture: Fixture, write: Callable[[Database, Fixture, str], None], prefix: str, writers: int, n: int
) -> float:
    """`n` writes spread over `writers` threads, each with its own Database; wall seconds."""
    databases = [target.open() for _ in range(writers)]
    try:
        for index, db in enumerate(databases):  # connect and warm the code paths before timing
            for number in range(WARM_UP_WRITES // writers + 1):
                write(db, fixture, f"{prefix}-warm-{index}-{number}")
        barrier = threading.Barrier(writers + 1)
        errors: list[BaseException] = []

        def run(index: int, db: Database) -> None:
            barrier.wait()
            try:
                for number in range(index, n, writers):
                    write(db, fixture, f"{prefix}-{number}")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=item) for item in enumerate(databases)]
        for thread in threads:
            thread.start()
        barrier.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        if errors:
            raise errors[0]
        return elapsed
    finally:
        for db in databases:
            db.dispose()


def bench_writes(target: Target, writes: int, threads: int) -> list[WriteResult]:
    db = target.open()
    try:
        fixture = make_fixture(db)
    finally:
        db.dispose()
    results = []
    for writers in (1, threads):
        mode = "1 writer" if writers == 1 else f"{writers} threads"
        log(f"{target.backend}: {writes} writes, {mode}: baseline, then audited")
        baseline_s = run_writers(target, fixture, plain_write, f"plain-{writers}", writers, writes)
        audited_s = run_writers(target, fixture, audited_write, f"audited-{writers}", writers, writes)
        result = WriteResult(mode, writers, writes, audited_s, baseline_s)
        log(f"{target.backend}:   audited {result.audited_per_s:.0f}/s, baseline {result.baseline_per_s:.0f}/s")
        results.append(result)
    db = target.open()
    try:
        report = verify(db, strict=True)  # the chain and anchor hold; the plain baseline rows have no events
        problems = [p for p in report.row_problems if "no audit event" not in p]
        if report.first_bad_seq is not None or report.schema_problems or problems:
            raise SystemExit(f"{target.backend}: the chain does not verify after the write benchmark: {report}")
    finally:
        db.dispose()
    return results


# --- report ------------------------------------------------------------------------------------------------


def environment(postgres: str | None) -> str:
    parts = [
        f"{os.cpu_count()} CPU cores",
        f"Python {platform.python_version()}",
        f"SQLite {sqlite3.sqlite_version} (WAL, synchronous=FULL)",
    ]
    return ", ".join([*parts, postgres] if postgres else parts)


def postgres_version(db: Database) -> str:
    with db.read_session() as session:
        version = session.scalar(text("SHOW server_version"))
        sync = session.scalar(text("SHOW synchronous_commit"))
    return f"PostgreSQL {version} (synchronous_commit={sync})"


def write_table(results: dict[str, list[WriteResult]]) -> str:
    lines = [
        "| backend | writers | writes | audited writes/s | plain inserts/s (baseline) | audited / baseline |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for backend, rows in results.items():
        for row in rows:
            lines.append(
                f"| {backend} | {row.mode} | {row.writes:,} | {row.audited_per_s:,.0f} | {row.baseline_per_s:,.0f} "
                f"| {row.audited_per_s / row.baseline_per_s:.2f} |"
            )
    return "\n".join(lines)


def verify_table(results: dict[str, VerifyResult]) -> str:
    lines = [
        "| backend | events | records | build s | verify s | events/s "
        "| read events and records s (baseline) | verify / read | load events s (no checks) | verify / load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for backend, row in results.items():
        lines.append(
            f"| {backend} | {row.events:,} | {row.rows:,} | {row.build_s:.1f} | {row.verify_s:.2f} "
            f"| {row.events / row.verify_s:,.0f} | {row.read_s:.2f} | {row.verify_s / row.read_s:.1f} "
            f"| {row.orm_read_s:.2f} | {row.verify_s / row.orm_read_s:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default="postgresql://127.0.0.1:5432/test", metavar="URL")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--writes", type=int, default=1000, help="writes per measurement (default 1000)")
    parser.add_argument("--events", type=int, default=100_000, help="events in the verify chain (default 100000)")
    parser.add_argument("--threads", type=int, default=8, help="concurrent writer threads (default 8)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    writes: dict[str, list[WriteResult]] = {}
    verifies: dict[str, VerifyResult] = {}
    postgres: str | None = None
    with tempfile.TemporaryDirectory(prefix="medvqa-bench-") as folder:
        targets = [lambda: sqlite_target(Path(folder))]
        if not args.no_postgres:
            targets.append(lambda: postgres_target(args.postgres, Path(folder)))
        for open_target in targets:
            with open_target() as target:
                db = target.open()
                try:
                    upgrade(db)
                    if target.backend == "postgresql":
                        postgres = postgres_version(db)
                finally:
                    db.dispose()
                # The chain first, on the fresh schema, so that verify covers exactly --events events.
                verifies[target.backend] = bench_verify(target, args.events)
                writes[target.backend] = bench_writes(target, args.writes, args.threads)

    print(f"\n## medvqa audit benchmark\n\n{environment(postgres)}; total run {time.perf_counter() - started:.0f} s\n")
    print(f"### Audited writes (give_feedback) vs plain inserts of the same row\n\n{write_table(writes)}\n")
    print(f"### `audit verify` on {args.events:,} events and as many records\n\n{verify_table(verifies)}")


if __name__ == "__main__":
    main()
