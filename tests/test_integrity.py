"""Tamper evidence for every record, not only for audit events (real SQLite or PostgreSQL).

An insider with database access edits, deletes or inserts feedback, rewrites an answer, raises a user's role,
promotes an adapter, clears a burned-in-text hold, drops or disables the append-only triggers, renames a role,
or stores details with a duplicate key: `medvqa audit verify` (the plain check, the one the workbench button
runs) fails and names the table and id. Statement forms that would rewrite an append-only row with the
triggers in place (SQLite REPLACE, upserts) are refused by the database itself.
"""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest
from click.testing import CliRunner
from sqlalchemy import insert, select, text
from sqlalchemy.exc import DBAPIError

from compliance.audit_chain import AuditIntegrityError
from compliance.policy import Action
from medvqa.cli import main
from medvqa.db import Adapter, AdapterStatus, AuditEvent, Feedback, Instance, Series, Study
from medvqa.db.append_only import sqlite_triggers
from medvqa.db.tracking import UnauditedWrite
from medvqa.services import audit
from medvqa.services.audit import verify
from medvqa.services.feedback import FeedbackInput, give_feedback
from medvqa.services.review import ReviewInput, adjudicate
from medvqa.services.transaction import write
from medvqa.services.users import change_role, set_active
from tests import factories
from tests.factories import OPERATOR
from tests.tampering import rehash_from


@pytest.fixture
def history(db, clinician, answer_id):
    """A small real history: accounts, a study with a series and an instance, an answer, feedback, a review,
    an adapter, each written through the services (or as they write) with its audit event."""
    reviewer = factories.make_user(db, "reviewer")
    give_feedback(db, clinician, FeedbackInput(answer_id, "correct", "k1", comment="looks right"))
    give_feedback(db, clinician, FeedbackInput(answer_id, "partial", "k2"))
    adjudicate(db, reviewer, ReviewInput(answer_id, "partial", "review", factories.PASSWORD, reference_answer="yes"))

    def imaging(session):
        study = session.scalars(select(Study)).first()
        series = Series(study_id=study.id, series_uid="2.25.1", modality="US", spacing={}, default_window={})
        session.add(series)
        session.flush()
        instance = Instance(
            series_id=series.id,
            sop_instance_uid="2.25.2",
            rows=8,
            columns=8,
            pixel_hash="c" * 64,
            storage_path="ab/cd/x.dcm",
            held_for_burned_in_text=True,
        )
        session.add(instance)
        session.flush()
        audit.record(session, OPERATOR, Action.STUDY_IMPORT, "study", study.id)

    write(db, imaging)

    def adapter(session):
        row = Adapter(name="round1", sha256="d" * 64, path="/adapters/round1", base_model_ref="m@0", metrics={"a": 1.5})
        row.status = AdapterStatus.CANDIDATE
        session.add(row)
        session.flush()
        audit.record(session, OPERATOR, Action.ROUND_RUN, "adapter", row.id)

    write(db, adapter)
    return {"reviewer": reviewer, "clinician": clinician, "answer_id": answer_id}


def disable_append_only(connection):
    if connection.dialect.name == "sqlite":
        for table in ("audit_events", "feedback"):
            for verb in ("update", "delete", "replace"):
                connection.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_{verb}"))
    else:
        connection.execute(text("ALTER TABLE feedback DISABLE TRIGGER USER"))
        connection.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))


def enable_append_only(connection):
    """Put the triggers back, so that only the tampering itself is left to find."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("ALTER TABLE feedback ENABLE TRIGGER USER"))
        connection.execute(text("ALTER TABLE audit_events ENABLE TRIGGER USER"))
        return
    for table in ("audit_events", "feedback"):
        for sql in sqlite_triggers(table).values():
            connection.execute(text(sql))


def tamper(db, *statements, keep_triggers_off=False):
    with db.engine.begin() as connection:
        disable_append_only(connection)
        for statement in statements:
            connection.execute(text(statement))
        if not keep_triggers_off:
            enable_append_only(connection)


def run_verify(*options):
    result = CliRunner().invoke(main, ["audit", "verify", "--json", *options])
    assert "Traceback" not in result.output
    return result.exit_code, json.loads(result.stdout)


def test_an_untouched_history_verifies_every_record(db, cli_env, history):
    code, report = run_verify("--strict")
    assert code == 0, report["reason"]
    assert report["rows_checked"] >= 9 and report["row_problems"] == [] and report["schema_problems"] == []


# Each: the SQL an insider runs (with the triggers out of the way where they would refuse), and the problem.
EDITS = {
    "edit feedback": (["UPDATE feedback SET verdict = 'correct' WHERE idempotency_key = 'k2'"], "feedback", "changed"),
    "delete feedback": (["DELETE FROM feedback WHERE idempotency_key = 'k2'"], "feedback", "deleted outside"),
    "insert feedback": (
        [
            "INSERT INTO feedback (answer_id, verdict, idempotency_key, body_sha256, version, created_at) "
            "SELECT answer_id, 'incorrect', 'forged', body_sha256, 1, created_at FROM feedback WHERE id = 1"
        ],
        "feedback",
        "no audit event",
    ),
    "rewrite an answer": (["UPDATE answers SET text = 'no'"], "answers", "changed"),
    "rewrite a question": (["UPDATE questions SET text = 'Is it normal?'"], "questions", "changed"),
    "raise a role": (["UPDATE users SET role_id = (SELECT id FROM roles WHERE name = 'admin')"], "users", "changed"),
    "reset a password": (["UPDATE users SET password_hash = 'x' WHERE id = 1"], "users", "changed"),
    "re-enable an account": (["UPDATE users SET is_active = NOT is_active"], "users", "changed"),
    "insert an account": (
        [
            "INSERT INTO users (username, display_name, role_id, password_hash, is_active, created_at) "
            "SELECT 'mallory', 'M', role_id, password_hash, is_active, created_at FROM users WHERE id = 1"
        ],
        "users",
        "no audit event",
    ),
    "change a review": (["UPDATE reviews SET verdict = 'correct'"], "reviews", "changed"),
    "promote an adapter": (["UPDATE adapters SET status = 'live'"], "adapters", "changed"),
    "edit adapter metrics": (["UPDATE adapters SET metrics = '{\"a\": 9.5}'"], "adapters", "changed"),
    "release a hold": (["UPDATE instances SET held_for_burned_in_text = false"], "instances", "changed"),
    "move a study": (["UPDATE studies SET patient_pseudonym = 'ANON-OTHER'"], "studies", "changed"),
    "delete a review": (["DELETE FROM reviews"], "reviews", "deleted outside"),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_an_insider_edit_of_a_record_is_named_by_the_plain_check(db, cli_env, history, name):
    statements, table, problem = EDITS[name]
    tamper(db, *statements)
    code, report = run_verify()
    assert code == 1, f"{name} went unnoticed"
    assert any(p.startswith(f"{table} ") and problem in p for p in report["row_problems"]), report["row_problems"]
    assert problem in report["reason"]


def test_renaming_a_role_is_detected(db, cli_env, history):
    tamper(db, "UPDATE roles SET name = 'superuser' WHERE name = 'auditor'")
    code, report = run_verify()
    assert code == 1 and "roles table" in report["reason"]


@pytest.mark.parametrize("verb", ["update", "delete", "replace"])
def test_a_dropped_or_disabled_trigger_is_detected(db, cli_env, history, verb):
    with db.engine.begin() as connection:
        if db.backend == "sqlite":
            connection.execute(text(f"DROP TRIGGER feedback_no_{verb}"))
        elif verb == "replace":
            connection.execute(text("DROP TRIGGER feedback_append_only ON feedback"))
        else:
            connection.execute(text("ALTER TABLE feedback DISABLE TRIGGER USER"))
    code, report = run_verify()
    assert code == 1 and "trigger" in report["reason"] and "feedback" in report["reason"]


def test_a_trigger_rewritten_to_do_nothing_is_detected(db, cli_env, history):
    with db.engine.begin() as connection:
        if db.backend == "sqlite":
            connection.execute(text("DROP TRIGGER feedback_no_update"))
            connection.execute(text("CREATE TRIGGER feedback_no_update BEFORE UPDATE ON feedback BEGIN SELECT 1; END"))
        else:
            connection.execute(
                text(
                    "CREATE OR REPLACE FUNCTION medvqa_refuse_change() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RETURN NEW; END $$"
                )
            )
    code, report = run_verify()
    assert code == 1 and "altered" in report["reason"]


REWRITES = {
    "sqlite": [
        "INSERT OR REPLACE INTO feedback SELECT * FROM feedback WHERE id = 1",
        "REPLACE INTO feedback (id, answer_id, verdict, idempotency_key, body_sha256, version, created_at) SELECT "
        "id, answer_id, 'incorrect', idempotency_key, body_sha256, version, created_at FROM feedback WHERE id = 1",
        "INSERT INTO feedback SELECT * FROM feedback WHERE id = 1 ON CONFLICT (id) DO UPDATE SET verdict = 'incorrect'",
        "INSERT INTO feedback SELECT * FROM feedback WHERE id = 1 ON CONFLICT DO NOTHING",
        "UPDATE OR REPLACE feedback SET verdict = 'incorrect'",
        "INSERT OR REPLACE INTO audit_events SELECT * FROM audit_events WHERE seq = 1",
    ],
    "postgresql": [
        "INSERT INTO feedback SELECT * FROM feedback WHERE id = 1 ON CONFLICT (id) DO UPDATE SET verdict = 'incorrect'",
        "INSERT INTO feedback SELECT * FROM feedback WHERE id = 1 "
        "ON CONFLICT (idempotency_key) DO UPDATE SET comment = 'forged'",
        "INSERT INTO audit_events SELECT * FROM audit_events WHERE seq = 1 "
        "ON CONFLICT (seq) DO UPDATE SET outcome = 'denied'",
        "MERGE INTO feedback f USING (SELECT 1 AS id) s ON f.id = s.id "
        "WHEN MATCHED THEN UPDATE SET verdict = 'correct'",
        "MERGE INTO feedback f USING (SELECT 1 AS id) s ON f.id = s.id WHEN MATCHED THEN DELETE",
    ],
}


@pytest.mark.parametrize("number", range(6))
def test_every_statement_form_that_rewrites_an_append_only_row_is_refused(db, cli_env, history, number):
    statements = REWRITES[db.backend]
    if number >= len(statements):
        pytest.skip(f"{db.backend} has {len(statements)} such statement forms")
    with db.read_session() as session:
        before = [tuple(row) for row in session.execute(select(Feedback.__table__).order_by(Feedback.id))]
    with pytest.raises(DBAPIError, match="append-only"), db.engine.begin() as connection:
        connection.execute(text(statements[number]))
    with db.read_session() as session:
        assert [tuple(row) for row in session.execute(select(Feedback.__table__).order_by(Feedback.id))] == before
    assert run_verify()[0] == 0


def test_details_with_a_duplicate_key_are_refused_on_write_and_flagged_on_verify(db, cli_env, history):
    with pytest.raises(AuditIntegrityError):
        write(db, lambda s: audit.record(s, OPERATOR, "test:event:create", "test", details={1: "a", "1": "b"}))
    with pytest.raises(AuditIntegrityError):
        write(db, lambda s: audit.record(s, OPERATOR, "test:event:create", "test", details={"row_digests": []}))
    write(db, lambda s: audit.record(s, OPERATOR, "test:event:create", "test", details={"note": "a"}))
    with db.read_session() as session:
        seq = session.scalar(select(AuditEvent.seq).order_by(AuditEvent.seq.desc()).limit(1))
    # The same object with its key twice: the parsed value (and so the hash) is unchanged, the text is not.
    tamper(db, f"""UPDATE audit_events SET details = '{{"note": "b", "note": "a"}}' WHERE seq = {seq}""")
    code, report = run_verify()
    assert code == 1 and report["first_bad_seq"] == seq and "duplicate key" in report["reason"]


def test_a_transaction_that_writes_a_record_without_an_event_is_refused(db, clinician):
    def unaudited(session):
        session.add(Study(study_uid="2.25.99", patient_pseudonym="anon-2", modality="CT"))

    with pytest.raises(UnauditedWrite, match="studies"):
        write(db, unaudited)
    with db.read_session() as session:
        assert session.scalar(select(Study.id).where(Study.study_uid == "2.25.99")) is None


def test_an_empty_or_cut_anchor_on_a_non_empty_history_fails_the_plain_check(db, cli_env, history, anchor_path):
    lines = anchor_path.read_text().splitlines(keepends=True)
    anchor_path.write_text("".join(lines[: len(lines) // 2]))
    code, report = run_verify()
    assert code == 1 and report["first_bad_seq"] is not None
    anchor_path.write_text("")
    code, report = run_verify()
    assert code == 1 and report["first_bad_seq"] == 1


def test_a_missing_anchor_fails_whatever_the_database_holds(db, cli_env, anchor_path):
    anchor_path.unlink()
    code, report = run_verify()
    assert code == 1 and "missing" in report["reason"]
    # even with every event deleted as well
    with db.engine.begin() as connection:
        disable_append_only(connection)
        connection.execute(text("DELETE FROM audit_events"))
    code, report = run_verify()
    assert code == 1 and "missing" in report["reason"]


def test_an_anchor_path_that_is_a_folder_gives_one_line(db, cli_env, anchor_path, monkeypatch, tmp_path):
    folder = tmp_path / "anchor-folder"
    folder.mkdir()
    monkeypatch.setenv("MEDVQA_AUDIT_ANCHOR", str(folder))
    result = CliRunner().invoke(main, ["audit", "verify"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.count("\n") == 1 and "is a folder, not a file" in result.output


def test_role_changes_and_disabling_are_vouched_for(db, cli_env, history):
    reviewer = history["reviewer"]
    change_role(db, OPERATOR, reviewer.name, "clinician")
    set_active(db, OPERATOR, reviewer.name, active=False)
    assert run_verify("--strict")[0] == 0
    tamper(db, f"UPDATE users SET is_active = true WHERE id = {reviewer.user_id}")
    code, report = run_verify()
    assert code == 1 and f"users {reviewer.user_id} was changed" in report["reason"]


def test_verify_while_writers_write_reports_no_false_problem(db, clinician, answer_id):
    """Events, rows and triggers are read in one snapshot and the anchor after it: concurrent writes are
    either wholly in the check or wholly after it."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer():
        number = 0
        try:
            while not stop.is_set():
                give_feedback(db, clinician, FeedbackInput(answer_id, "correct", f"c{number}"))
                number += 1
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        reports = [verify(db) for _ in range(15)]
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert all(r.ok for r in reports), [r.reason for r in reports if not r.ok]
    assert reports[-1].events > reports[0].events


def test_bulk_events_inserted_around_medvqa_are_caught(db, cli_env, history):
    """A forged event appended with a valid hash and chain link, but no anchor line (written around medvqa)."""
    with db.read_session() as session:
        events = list(audit.iter_events(session))
    last = events[-1]
    forged = rehash_from([*events, dataclasses.replace(last, seq=last.seq + 1, actor_name="mallory")], len(events))
    with db.engine.begin() as connection:
        row = {**vars(forged[-1]), "details": dict(forged[-1].details)}
        connection.execute(insert(AuditEvent), [row])
    code, report = run_verify()
    assert code == 1 and report["first_bad_seq"] == last.seq + 1
