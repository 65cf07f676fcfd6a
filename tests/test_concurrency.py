"""16 concurrent writers on SQLite and 64 on PostgreSQL adding feedback with audit events:
no row lost, no duplicate, chain verifies.

SQLite writers are separate OS processes (the 'spawn' start method), one per writer. PostgreSQL writers
are 64 threads spread over 4 spawned processes, each thread with its own Database and connection, so the
advisory lock and the anchor file are shared between processes as well as between threads.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import URL

from compliance.policy import Action
from medvqa.db import AuditEvent, Feedback
from medvqa.db.engine import Database
from medvqa.services.audit import Actor, verify
from tests.workers import Outcome, Submission, WriterPool

WRITES_PER_WRITER = 6
WRITERS = {"sqlite": 16, "postgresql": 64}
PROCESSES = {"sqlite": 16, "postgresql": 4}


@pytest.fixture(scope="module")
def pool(template_url: URL) -> Iterator[WriterPool]:
    backend = template_url.get_backend_name()
    writer_pool = WriterPool(WRITERS[backend], PROCESSES[backend])
    yield writer_pool
    writer_pool.close()


@pytest.fixture(autouse=True)
def _writers_fit_the_server(db: Database) -> None:
    """64 writers need 64 connections at once; say so plainly rather than fail inside a writer."""
    if db.backend != "postgresql":
        return
    with db.read_session() as session:
        limit = int(session.scalar(text("SHOW max_connections")))
        used = int(session.scalar(text("SELECT count(*) FROM pg_stat_activity")))
    if limit - used < WRITERS["postgresql"] + 5:
        pytest.fail(f"the PostgreSQL server allows {limit} connections and {used} are in use: too few for 64 writers")


def _run(
    pool: WriterPool, db: Database, database_url: URL, actor: Actor, answer_id: int, batches: list[list[Submission]]
) -> list[Outcome]:
    assert len(batches) == WRITERS[db.backend]
    outcomes = pool.run(
        database_url.render_as_string(hide_password=False), str(db.anchor.path), actor, answer_id, batches
    )
    # The writers really were spread over separate OS processes, none of them this one.
    assert {outcome.pid for outcome in outcomes} == pool.pids
    assert os.getpid() not in pool.pids
    assert len(pool.pids) == PROCESSES[db.backend]
    return outcomes


def _feedback_rows(db: Database) -> list[Feedback]:
    with db.read_session() as session:
        return list(session.scalars(select(Feedback).order_by(Feedback.id)))


def _feedback_events(db: Database) -> list[AuditEvent]:
    with db.read_session() as session:
        query = select(AuditEvent).where(AuditEvent.action == Action.FEEDBACK_CREATE).order_by(AuditEvent.seq)
        return list(session.scalars(query))


def _assert_chain_verifies_and_is_fully_anchored(db: Database) -> None:
    # Every writer returned normally, so each committed event was also anchored, exactly once: even the
    # strict check, which fails on any event missing from the anchor, passes.
    report = verify(db, strict=True)
    assert report.ok, report.reason
    assert (report.unconfirmed_events, report.unresolved_intents) == (0, 0)
    assert report.warnings == []
    with db.read_session() as session:
        heads = {seq: {digest} for seq, digest in session.execute(select(AuditEvent.seq, AuditEvent.hash))}
    assert report.events == len(heads)
    anchor = db.anchor.read()
    assert anchor.intents == heads and anchor.commits == heads and anchor.aborts == {}
    anchor_lines = list(db.anchor.lines())
    assert len(anchor_lines) == 2 * len(heads), "an event was anchored twice"


def test_concurrent_writers_lose_nothing_duplicate_nothing_and_chain_verifies(
    pool: WriterPool, db: Database, database_url: URL, clinician: Actor, answer_id: int
) -> None:
    writers = WRITERS[db.backend]
    batches = [
        [Submission(f"w{writer}-n{n}", comment=f"writer {writer} note {n}") for n in range(WRITES_PER_WRITER)]
        for writer in range(writers)
    ]
    expected_keys = {item.key for batch in batches for item in batch}
    assert len(expected_keys) == writers * WRITES_PER_WRITER
    with db.read_session() as session:
        events_before = session.scalar(select(func.count()).select_from(AuditEvent))

    outcomes = _run(pool, db, database_url, clinician, answer_id, batches)

    # Every call stored a new row and said so.
    assert len(outcomes) == len(expected_keys)
    assert all(outcome.error is None and outcome.created for outcome in outcomes)
    returned = {outcome.key: outcome.feedback_id for outcome in outcomes}
    assert set(returned) == expected_keys
    assert len(set(returned.values())) == len(returned), "two calls were given the same feedback id"

    # The table holds exactly the submissions: none lost, none twice, each with what its writer sent.
    rows = _feedback_rows(db)
    assert len(rows) == len(expected_keys)
    assert Counter(row.idempotency_key for row in rows) == Counter(expected_keys)
    assert {row.idempotency_key: row.id for row in rows} == returned
    sent = {item.key: item.comment for batch in batches for item in batch}
    assert all(row.comment == sent[row.idempotency_key] for row in rows)
    assert all(row.answer_id == answer_id and row.author_id == clinician.user_id for row in rows)
    assert all(row.version == 1 and row.supersedes_id is None for row in rows)

    # One audit event per row, naming that row; no other events were written.
    events = _feedback_events(db)
    assert len(events) == len(rows)
    assert Counter(event.object_id for event in events) == Counter(str(row.id) for row in rows)
    assert all(event.object_type == "feedback" and event.outcome == "success" for event in events)
    assert all(event.actor_user_id == clinician.user_id for event in events)
    with db.read_session() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == events_before + len(rows)

    _assert_chain_verifies_and_is_fully_anchored(db)


def test_concurrent_twins_with_one_key_store_one_row_and_all_get_its_id(
    pool: WriterPool, db: Database, database_url: URL, clinician: Actor, answer_id: int
) -> None:
    writers = WRITERS[db.backend]
    same = Submission("one-key", verdict="incorrect", comment="the same body from every writer")

    outcomes = _run(pool, db, database_url, clinician, answer_id, [[same] for _ in range(writers)])

    assert len(outcomes) == writers
    assert all(outcome.error is None for outcome in outcomes), Counter(o.error for o in outcomes)
    rows = _feedback_rows(db)
    assert len(rows) == 1
    (row,) = rows
    assert (row.idempotency_key, row.verdict, row.comment) == (same.key, same.verdict, same.comment)
    assert {outcome.feedback_id for outcome in outcomes} == {row.id}
    assert sorted(outcome.created for outcome in outcomes) == [False] * (writers - 1) + [True]

    events = _feedback_events(db)
    assert [(event.object_id, event.outcome) for event in events] == [(str(row.id), "success")]
    _assert_chain_verifies_and_is_fully_anchored(db)


def test_concurrent_different_bodies_under_one_key_store_one_row_and_refuse_the_rest(
    pool: WriterPool, db: Database, database_url: URL, clinician: Actor, answer_id: int
) -> None:
    writers = WRITERS[db.backend]
    batches = [[Submission("contested-key", comment=f"body of writer {writer}")] for writer in range(writers)]

    outcomes = _run(pool, db, database_url, clinician, answer_id, batches)

    assert len(outcomes) == writers
    winners = [outcome for outcome in outcomes if outcome.error is None]
    losers = [outcome for outcome in outcomes if outcome.error is not None]
    assert len(winners) == 1, winners
    (winner,) = winners
    assert winner.created is True
    assert [outcome.error for outcome in losers] == ["IdempotencyConflict"] * (writers - 1)

    rows = _feedback_rows(db)
    assert len(rows) == 1
    (row,) = rows
    assert row.id == winner.feedback_id
    assert (row.idempotency_key, row.comment) == ("contested-key", winner.comment)

    # The stored row has its one success event; each refusal was audited as a failure on the answer.
    events = _feedback_events(db)
    successes = [event for event in events if event.outcome == "success"]
    failures = [event for event in events if event.outcome == "failed"]
    assert len(successes) + len(failures) == len(events)
    assert [(event.object_type, event.object_id) for event in successes] == [("feedback", str(row.id))]
    assert len(failures) == writers - 1
    assert all(event.object_type == "answer" and event.object_id == str(answer_id) for event in failures)
    assert all(event.details["idempotency_key"] == "contested-key" for event in failures)
    _assert_chain_verifies_and_is_fully_anchored(db)
