"""`medvqa pacs find|retrieve` (DICOMweb, or DIMSE with --dimse) and `medvqa listen` (a C-STORE listener).

Registered on the main command in medvqa/cli/__init__.py. `pacs` acts as the named account with `--user` (a clinician or
reviewer, password from a prompt or the first line of stdin), else as the operator; `listen` as the operator.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from medvqa.cli.support import OneLineErrorGroup, study_line, user_option
from medvqa.cli.support import emit as _emit
from medvqa.cli.support import json_option as _json_option
from medvqa.cli.support import open_database as _open_database
from medvqa.cli.support import operator as _operator
from medvqa.cli.support import signed_in as _signed_in

_user_option = user_option("a clinician or reviewer", required=False)
_dimse_option = click.option(
    "--dimse", is_flag=True, help="Use the DIMSE PACS (MEDVQA_DIMSE_PACS: C-FIND, C-GET) instead of DICOMweb."
)


@click.group(cls=OneLineErrorGroup)
def pacs() -> None:
    """Search the hospital's PACS and retrieve studies from it (MEDVQA_DICOMWEB_URL, or MEDVQA_DIMSE_PACS)."""


@pacs.command("find")
@click.option("--patient-id", help="The PACS's patient ID (wildcards * and ? allowed).")
@click.option("--accession", help="Accession number.")
@click.option("--modality", help="Modality in the study (CT, MR, CR...).")
@click.option("--date", "dates", help="Study date YYYYMMDD, or a range YYYYMMDD-YYYYMMDD (either end open).")
@click.option("--limit", type=int, default=50, show_default=True, help="Most studies listed (1-500).")
@_dimse_option
@_user_option
@_json_option
def pacs_find(
    patient_id: str | None,
    accession: str | None,
    modality: str | None,
    dates: str | None,
    limit: int,
    dimse: bool,
    username: str | None,
    as_json: bool,
) -> None:
    """List the PACS's studies that match (at least one filter). The PACS's identifiers are shown for this
    search only; the audit trail keeps who searched and the filters as keyed identifiers."""
    from medvqa.config import load_settings
    from medvqa.pacs.query import StudyQuery
    from medvqa.services.pacs import find_studies

    query = StudyQuery.build(patient_id, accession, modality, dates, limit)
    database = _open_database()
    actor = _signed_in(database, username) if username else _operator()
    studies = find_studies(database, actor, query, load_settings(), "dimse" if dimse else "dicomweb")
    lines = [
        f"{s.study_uid}  {s.study_date.isoformat() if s.study_date else '-':10}  "
        f"{'/'.join(s.modalities) or '-':8}  {s.instances if s.instances is not None else '?':>5} instance(s)  "
        f"{s.description}"
        for s in studies
    ]
    lines.append(f"{len(studies)} study(ies)" + (f" (the first {limit})" if len(studies) >= limit else ""))
    _emit(as_json, {"studies": [s.as_dict() for s in studies]}, "\n".join(lines))


@pacs.command("retrieve")
@click.argument("study_uid")
@click.option("--series", "series_uid", help="Only this series (its Series Instance UID).")
@_dimse_option
@_user_option
@_json_option
def pacs_retrieve(study_uid: str, series_uid: str | None, dimse: bool, username: str | None, as_json: bool) -> None:
    """Retrieve a study (as `pacs find` lists it) through the import path: checked, de-identified, stored,
    audited. Instances already stored are not downloaded again; a transfer cut in the middle keeps what was
    imported, and running the command again completes it. Exits 1 when the transfer stopped or an instance was
    refused."""
    from medvqa.config import load_settings
    from medvqa.services.pacs import retrieve_study

    database = _open_database()
    actor = _signed_in(database, username) if username else _operator()
    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if as_json or total == 0:
            return
        if bar is None:
            bar = click.progressbar(length=total, label="retrieving", file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)

    try:
        report = retrieve_study(
            database,
            actor,
            study_uid,
            load_settings(),
            series_uid=series_uid,
            via="dimse" if dimse else "dicomweb",
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    summary = report.as_dict()
    lines = [outcome.line() for outcome in report.outcomes]
    lines.append(
        f"study {report.study_uid} (id {', '.join(map(str, report.study_ids)) or '-'}): the PACS lists "
        f"{report.listed} instance(s); {report.already_stored} were already stored, {summary['imported']} imported, "
        f"{summary['refused']} refused, {summary['held']} held until a reviewer confirms there is no burned-in text"
    )
    if report.study_ids:
        from medvqa.services.studies import list_studies

        lines += [study_line(row) for row in list_studies(database, actor) if row["id"] in report.study_ids]
    if not report.complete:
        lines.append(
            f"the transfer stopped: {report.stopped}; {report.not_transferred} instance(s) not transferred. "
            "What was imported is kept: run the same command again to complete it"
        )
    _emit(as_json, summary, "\n".join(lines))
    if not report.complete or summary["refused"]:
        sys.exit(1)


@click.command("listen", cls=click.Command)
@click.option("--port", type=click.IntRange(1, 65535), help="Port to listen on (default MEDVQA_LISTEN_PORT, 11112).")
@click.option("--ae-title", help="Our AE title (default MEDVQA_DIMSE_AE_TITLE, MEDVQA).")
def listen_command(port: int | None, ae_title: str | None) -> None:
    """A DICOM Storage SCP (C-STORE, C-ECHO) that imports what modalities and PACS send, per association,
    through the import path. Only calling AE titles in MEDVQA_LISTEN_CALLING_AES may send (others are rejected
    and audited). Binds MEDVQA_LISTEN_ADDRESS (127.0.0.1 by default). Stops gracefully on SIGTERM or Ctrl-C,
    importing what it has received first."""
    import logging
    import signal
    import threading

    from medvqa.cli.support import fail
    from medvqa.config import load_settings
    from medvqa.errors import MedVQAError
    from medvqa.services.listener import listen

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("pynetdicom", "pydicom"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        listen(_open_database(), _operator(), load_settings(), stop, port=port, ae_title=ae_title)
    except MedVQAError as exc:
        fail(str(exc))
