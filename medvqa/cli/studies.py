"""`medvqa import`, `medvqa store check`, `medvqa studies list`: studies in, the store checked, studies listed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from medvqa.cli.support import emit as _emit
from medvqa.cli.support import json_option as _json_option
from medvqa.cli.support import open_database as _open_database
from medvqa.cli.support import operator as _operator
from medvqa.cli.support import study_line as _study_line
from medvqa.errors import MedVQAError

if TYPE_CHECKING:
    pass


@click.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@_json_option
def import_command(paths: tuple[Path, ...], as_json: bool) -> None:
    """Import DICOM files, folders (recursive), zip files and DICOMDIRs; PNG and JPEG become
    secondary-capture studies. Everything is de-identified before it is stored. Every input (file, zip member,
    DICOMDIR entry, folder entry) gets one line: imported, already stored, skipped or refused, with the reason.
    Exits 1 when any input was refused; the other inputs are imported all the same."""
    from medvqa.config import load_settings
    from medvqa.services.studies import import_paths

    database = _open_database()
    try:
        report = import_paths(database, _operator(), list(paths), load_settings())
    except MedVQAError:
        raise
    except Exception as exc:  # a defect outside any one input: one line, never a traceback
        from medvqa.services.preparation import describe_unexpected

        raise MedVQAError(
            f"the import stopped on {describe_unexpected(exc)}; files it stored without rows are removed by "
            "`medvqa store check --prune`"
        ) from None
    summary = report.as_dict()
    lines = [outcome.line() for outcome in report.outcomes]
    lines.append(
        f"imported {summary['imported']} instance(s) into {len(summary['studies'])} study(ies); "
        f"{summary['duplicate']} already stored, {summary['skipped']} skipped, {summary['refused']} refused, "
        f"{summary['held']} held until a reviewer confirms there is no burned-in text"
    )
    if report.swept:
        lines.append(f"removed {report.swept} unreferenced file(s) an interrupted import had left in the store")
    if report.left_in_store:
        lines.append(
            f"{report.left_in_store} file(s) of refused instances stay in the store while another import runs: "
            "the next import removes them (or `medvqa store check --prune`)"
        )
    _emit(as_json, summary, "\n".join(lines))
    if summary["refused"]:
        sys.exit(1)


@click.group()
def store() -> None:
    """Check the store of de-identified instances against the database."""


@store.command("check")
@click.option("--prune", is_flag=True, help="Remove files no row references and temporary files (audited).")
@_json_option
def store_check(prune: bool, as_json: bool) -> None:
    """Check that the store holds only files the database references and that every referenced file exists.
    A killed import can leave unreferenced files: --prune removes them, waiting for running imports to finish.
    Exits 1 when a referenced file is missing, or unreferenced files are left (without --prune)."""
    from medvqa.config import load_settings
    from medvqa.services.store_check import check_store

    report = check_store(_open_database(), _operator(), load_settings(), prune=prune)
    lines = [
        f"store: {report.files} file(s), {report.referenced} referenced by the database; "
        f"{len(report.unreferenced)} unreferenced, {len(report.leftovers)} temporary, {len(report.missing)} missing"
    ]
    lines += [f"missing: instance {row_id}: {path}" for row_id, path in report.missing[:20]]
    lines += [f"not medvqa's (left alone): {path}" for path in report.foreign[:20]]
    if report.removed:
        lines.append(f"removed {report.removed} file(s)")
    elif report.unreferenced or report.leftovers:
        lines.append("run `medvqa store check --prune` to remove the unreferenced and temporary files")
    _emit(as_json, report.as_dict(), "\n".join(lines))
    if not report.ok:
        sys.exit(1)


@click.group()
def studies() -> None:
    """Browse imported (de-identified) studies."""


@studies.command("list")
@_json_option
def studies_list(as_json: bool) -> None:
    """List studies, newest import first."""
    from medvqa.services.studies import list_studies

    rows = list_studies(_open_database(), _operator())
    text = "\n".join(_study_line(row) for row in rows)
    _emit(as_json, {"studies": rows}, text or "no studies")
