"""The audit export holds every matching event (streamed, no row limit) and is itself audited."""

from __future__ import annotations

import csv
import io
import json

from click.testing import CliRunner
from sqlalchemy import func, select

from medvqa.cli import main
from medvqa.db import AuditEvent
from medvqa.services import audit
from medvqa.services.audit_log import AuditFilter, export_csv, write_csv
from medvqa.services.transaction import write
from tests import factories

EVENTS = 4_321  # more than one streamed batch of 2,000


def many_events(db, n=EVENTS):
    def work(session):
        for number in range(n):
            audit.record(session, factories.OPERATOR, "test:event:create", "test", number, details={"n": number})

    write(db, work)


def count(db):
    with db.read_session() as session:
        return session.scalar(select(func.count()).select_from(AuditEvent))


def test_the_export_holds_every_event_and_records_how_many(db):
    auditor = factories.make_user(db, "auditor")
    many_events(db)
    total = count(db)
    rows = list(csv.DictReader(io.StringIO(export_csv(db, auditor))))
    assert len(rows) == total and [int(r["seq"]) for r in rows] == list(range(1, total + 1))
    out = io.StringIO()
    assert write_csv(db, auditor, out, AuditFilter(action="test:event:create")) == EVENTS
    exports = [e for e in audit.iter_events(db.read_session()) if e.action == "audit:event:export"]
    assert [e.details["rows"] for e in exports] == [total, EVENTS]


def test_cli_export_streams_to_a_file_and_is_audited(db, cli_env, tmp_path):
    many_events(db, 2_500)
    target = tmp_path / "trail.csv"
    result = CliRunner().invoke(main, ["audit", "export", "--output", str(target), "--raw", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 2_500
    rows = list(csv.DictReader(target.open()))
    assert len(rows) == 2_500 and all(len(r["hash"]) == 64 for r in rows)
    assert not list(tmp_path.glob(".*partial"))
