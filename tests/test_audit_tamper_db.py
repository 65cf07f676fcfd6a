"""Tampering with a real database (triggers disabled first, as an insider with DDL rights would),
detected by `medvqa audit verify`, which exits 1 and names the first bad event."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from click.testing import CliRunner
from sqlalchemy import insert, text
from sqlalchemy.exc import DBAPIError

from medvqa.cli import main
from medvqa.db import AuditEvent
from medvqa.services import audit
from medvqa.services.transaction import write
from tests.factories import OPERATOR
from tests.tampering import TAMPERINGS, rehash_from

EVENTS = 12
TRIALS = 3


def populate(db, n=EVENTS):
    for i in range(n):
        write(db, lambda s, i=i: audit.record(s, OPERATOR, "test:event:create", "test", i, details={"i": i}))


def disable_append_only(connection):
    if connection.dialect.name == "sqlite":
        for verb in ("update", "delete"):
            connection.execute(text(f"DROP TRIGGER IF EXISTS audit_events_no_{verb}"))
    else:
        connection.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))


def replace_all_events(db, events):
    with db.engine.begin() as connection:
        disable_append_only(connection)
        connection.execute(AuditEvent.__table__.delete())
        if events:
            rows = [{**vars(e), "details": dict(e.details)} for e in events]
            connection.execute(insert(AuditEvent), rows)


def run_verify(*options):
    result = CliRunner().invoke(main, ["audit", "verify", "--json", *options])
    return result.exit_code, json.loads(result.stdout)


def test_untouched_database_verifies(db, cli_env):
    populate(db)
    code, report = run_verify()
    assert code == 0 and report["ok"] and report["events"] == EVENTS
    assert report["anchored_seq"] == EVENTS


@pytest.mark.parametrize("trial", range(TRIALS))
@pytest.mark.parametrize("kind", sorted(TAMPERINGS))
def test_tampering_in_the_database_is_detected(db, cli_env, kind, trial):
    populate(db)
    with db.read_session() as session:
        events = list(audit.iter_events(session))
    rng = random.Random(f"{kind}-{trial}")
    tampered, expected = TAMPERINGS[kind](events, rng)
    replace_all_events(db, tampered)
    code, report = run_verify()
    assert code == 1, f"{kind} went unnoticed: {report}"
    assert report["first_bad_seq"] == expected, report["reason"]


def test_plain_sql_edit_is_refused_then_detected_once_the_trigger_is_gone(db, cli_env):
    populate(db)
    with pytest.raises(DBAPIError, match="append-only"), db.engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET actor_name = 'mallory' WHERE seq = 5"))
    with db.engine.begin() as connection:
        disable_append_only(connection)
        connection.execute(text("UPDATE audit_events SET actor_name = 'mallory' WHERE seq = 5"))
    code, report = run_verify()
    assert code == 1 and report["first_bad_seq"] == 5


def test_removed_anchor_is_detected(db, cli_env, anchor_path):
    populate(db)
    anchor_path.unlink()
    code, report = run_verify()
    assert code == 1 and report["first_bad_seq"] == 1 and "missing" in report["reason"]


def test_verification_itself_is_audited(db, cli_env):
    populate(db, 2)
    run_verify()
    with db.read_session() as session:
        last = list(audit.iter_events(session))[-1]
    assert last.action == "audit:chain:verify" and last.outcome == "success"
    assert last.details == {"ok": True, "events": 2, "first_bad_seq": None}


def test_event_forged_at_the_end_fails_even_the_plain_check(db, cli_env):
    """Writers put an intent line in the anchor before they commit, so an event past the anchor's last line
    was not written by medvqa: the plain check (what the workbench button runs) fails on it."""
    populate(db, 4)
    with db.read_session() as session:
        events = list(audit.iter_events(session))
    forged = rehash_from([*events, dataclasses.replace(events[-1], seq=5, actor_name="mallory")], 4)
    replace_all_events(db, forged)
    code, report = run_verify()
    assert code == 1 and report["first_bad_seq"] == 5 and "no line in the anchor" in report["reason"]
    code, report = run_verify("--strict")
    assert code == 1 and report["first_bad_seq"] == 5


def test_forged_event_with_a_forged_anchor_line_fails(db, cli_env, anchor_path):
    """An insider who can append to the anchor but does not hold its key cannot make a forged event pass."""
    populate(db, 4)
    with db.read_session() as session:
        events = list(audit.iter_events(session))
    forged = rehash_from([*events, dataclasses.replace(events[-1], seq=5, actor_name="mallory")], 4)
    replace_all_events(db, forged)
    kid = anchor_path.read_text().splitlines()[-1].split()[3]
    with anchor_path.open("a") as anchor:
        for kind in ("I", "C"):
            anchor.write(f"{kind} 5 {forged[-1].hash} {kid} {'0' * 32}\n")
    for options in ((), ("--strict",)):
        code, report = run_verify(*options)
        assert code == 1 and report["first_bad_seq"] == 5 and "not authenticated" in report["reason"]
