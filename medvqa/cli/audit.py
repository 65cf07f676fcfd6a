"""`medvqa audit`: verify, export and re-key the audit trail."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from medvqa.cli.support import emit as _emit
from medvqa.cli.support import json_option as _json_option
from medvqa.cli.support import open_database as _open_database
from medvqa.cli.support import operator as _operator

if TYPE_CHECKING:
    pass


@click.group()
def audit() -> None:
    """Inspect the audit trail."""


@audit.command("verify")
@click.option(
    "--strict",
    is_flag=True,
    help="Also fail on the crash windows: events without their commit line, "
    "intent lines without an event. Use after a clean stop of every writer.",
)
@_json_option
def audit_verify(strict: bool, as_json: bool) -> None:
    """Check the hash chain, the anchor kept outside the database (and its keyed lines), every record the
    trail vouches for (feedback, answers, reviews, users, adapters, rounds, studies...), and the
    append-only triggers. Exits 1 naming the first bad event, or the records, when anything was edited,
    deleted, inserted, reordered or cut, or the chain was recomputed."""
    from medvqa.services.audit_log import verify_trail

    report = verify_trail(_open_database(), _operator(), strict)
    lines = []
    if report.ok:
        lines.append(
            f"audit trail OK: {report.events} events, {report.rows_checked} records, "
            f"anchored through {report.anchored_seq}"
        )
    elif report.first_bad_seq is not None:
        lines.append(f"audit trail BROKEN at event {report.first_bad_seq}: {report.reason}")
    else:
        lines.append(f"audit trail BROKEN: {report.reason}")
    lines += [f"record: {problem}" for problem in report.row_problems[1:]]
    lines += [f"schema: {problem}" for problem in report.schema_problems[1:]]
    lines += [f"warning: {warning}" for warning in report.warnings]
    lines += [f"note: {note}" for note in report.notes]
    _emit(as_json, report.as_dict(), "\n".join(lines))
    if not report.ok:
        sys.exit(1)


@audit.command("export")
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="CSV file to write ('-' for standard output).",
)
@click.option("--raw", is_flag=True, help="Stored values unchanged (to recompute hashes); never open in a spreadsheet.")
@click.option("--user", "user", default="", help="Only events of this actor.")
@click.option("--action", default="", help="Only this action (e.g. answer:feedback:create).")
@click.option("--since", type=click.DateTime(), help="From this UTC time.")
@click.option("--until", type=click.DateTime(), help="Up to this UTC time (inclusive).")
@_json_option
def audit_export(output: Path, raw: bool, user: str, action: str, since: Any, until: Any, as_json: bool) -> None:
    """Export every matching event (no limit, streamed) as CSV with its hashes; the export is audited."""
    from datetime import UTC

    from medvqa.services.audit_log import AuditFilter, write_csv

    search = AuditFilter(
        user=user,
        action=action,
        since=since.replace(tzinfo=UTC) if since else None,
        until=until.replace(tzinfo=UTC) if until else None,
    )
    database = _open_database()
    if str(output) == "-":
        write_csv(database, _operator(), sys.stdout, search, raw=raw)
        return
    temporary = output.with_name(f".{output.name}.partial")
    with temporary.open("w", encoding="utf-8", newline="") as handle:
        count = write_csv(database, _operator(), handle, search, raw=raw)
    temporary.replace(output)  # a reader never sees half an export
    _emit(as_json, {"rows": count, "output": str(output)}, f"exported {count} event(s) to {output}")


@audit.command("rotate-key")
@_json_option
def audit_rotate_key(as_json: bool) -> None:
    """Start signing anchor lines with a new key (MEDVQA_AUDIT_ANCHOR_KEY_FILE keeps the old ones for the
    lines they signed; a line signed with an old key after the new one was used fails verification)."""
    from medvqa.services.audit_log import rotate_anchor_key

    kid = rotate_anchor_key(_open_database(), _operator())
    _emit(as_json, {"key_id": kid}, f"anchor lines are now signed with key {kid}")
