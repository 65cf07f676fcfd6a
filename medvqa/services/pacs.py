"""Studies from the hospital's PACS: search it, and retrieve a study through the import path files take.

A search shows the PACS's own identifiers to the person who searched, for that search only; the audit trail
records who searched and with which filters, the patient ID and accession number as keyed identifiers (HMAC
under the site key: the same value gives the same identifier, and nobody without the key can reverse it).

A retrieve lists the study's instances, skips those already stored (their de-identified UIDs are keyed on the
PACS's, so they are known without downloading), downloads the rest, and imports them in batches: each batch is
committed on its own, so a transfer cut in the middle keeps what was imported, says so, and a rerun completes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from compliance.policy import Action
from medvqa.errors import InvalidInput, NotFound, PacsError
from medvqa.pacs.query import Fetched, PacsStudy, RemoteInstance, StudyQuery, check_uid
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.preparation import FileOutcome
from medvqa.services.queries import study_id_for
from medvqa.services.studies import (
    Received,
    build_deidentifier,
    import_received,
    stored_instance_uids,
    worker_pool,
)
from medvqa.services.transaction import write

if TYPE_CHECKING:
    from compliance.deid import Deidentifier
    from medvqa.config import Settings
    from medvqa.db.engine import Database
    from medvqa.services.audit import Actor

Via = Literal["dicomweb", "dimse"]
BATCH_INSTANCES = 64  # each batch commits on its own: a cut transfer keeps every batch before it
Progress = Callable[[int, int], None]  # (instances done, instances to download)


class Pacs(Protocol):
    """What a retrieve needs of a PACS connection (DICOMweb or DIMSE)."""

    def find_studies(self, query: StudyQuery) -> list[PacsStudy]: ...

    def list_instances(self, study_uid: str, series_uid: str | None = None) -> list[RemoteInstance]: ...

    def fetch_many(self, instances: list[RemoteInstance]) -> list[Fetched]: ...

    def close(self) -> None: ...


@dataclass
class RetrieveReport:
    """What a retrieve did: how many instances the PACS listed, how many were stored already (not downloaded),
    one outcome per instance downloaded, and why the transfer stopped when it did not finish."""

    listed: int = 0
    already_stored: int = 0
    outcomes: list[FileOutcome] = field(default_factory=list)
    stopped: str = ""
    study_uid: str = ""  # the pseudonymous Study Instance UID, as `studies list` shows it
    stored_study_id: int | None = None  # the study's id when it is stored (also when nothing new came)

    def count(self, status: str) -> int:
        return sum(1 for outcome in self.outcomes if outcome.status == status)

    @property
    def complete(self) -> bool:
        return not self.stopped

    @property
    def study_ids(self) -> list[int]:
        ids = {o.study_id for o in self.outcomes if o.study_id is not None}
        return sorted(ids | ({self.stored_study_id} if self.stored_study_id is not None else set()))

    @property
    def not_transferred(self) -> int:
        return self.listed - self.already_stored - len(self.outcomes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "studies": self.study_ids,
            "listed": self.listed,
            "already_stored": self.already_stored,
            "imported": self.count("imported"),
            "duplicate": self.count("duplicate"),
            "refused": self.count("refused"),
            "skipped": self.count("skipped"),
            "held": sum(o.held for o in self.outcomes),
            "not_transferred": self.not_transferred,
            "complete": self.complete,
            "stopped": self.stopped,
            "files": [{**vars(o), "line": o.line()} for o in self.outcomes],
        }


def connect(settings: Settings, via: Via) -> Pacs:
    """The configured PACS: DICOMweb (MEDVQA_DICOMWEB_URL) or DIMSE (MEDVQA_DIMSE_PACS)."""
    if via == "dimse":
        from medvqa.pacs.dimse import DimsePacs

        return DimsePacs(settings)
    from medvqa.pacs.dicomweb import DicomWeb

    return DicomWeb(settings)


def find_studies(
    db: Database, actor: Actor, query: StudyQuery, settings: Settings, via: Via = "dicomweb"
) -> list[PacsStudy]:
    """The PACS's studies matching `query` (at least one filter). Audited: who, which filters (keyed), how many."""
    authorize(db, actor, Action.PACS_FIND, "pacs")
    if query.is_empty():
        raise InvalidInput("give at least one of patient ID, accession number, modality or date")
    deid = build_deidentifier(settings)
    details: dict[str, Any] = {"via": via, "filters": _keyed_filters(deid, query), "limit": query.limit}
    try:
        pacs = connect(settings, via)
        try:
            studies = pacs.find_studies(query)
        finally:
            pacs.close()
    except PacsError as exc:
        _audit(db, actor, Action.PACS_FIND, None, {**details, "error": str(exc)}, "failed")
        raise
    _audit(db, actor, Action.PACS_FIND, None, {**details, "results": len(studies)})
    return studies


def retrieve_study(
    db: Database,
    actor: Actor,
    study_uid: str,
    settings: Settings,
    *,
    series_uid: str | None = None,
    via: Via = "dicomweb",
    progress: Progress | None = None,
) -> RetrieveReport:
    """Retrieve one study (or one of its series) from the PACS into the store, through the import path."""
    authorize(db, actor, Action.PACS_RETRIEVE, "pacs")
    study_uid = check_uid(study_uid)
    series_uid = check_uid(series_uid, "Series Instance UID") if series_uid else None
    deid = build_deidentifier(settings)
    report = RetrieveReport(study_uid=deid.uid(study_uid))
    details: dict[str, Any] = {"via": via, "study_uid": report.study_uid}
    if series_uid:
        details["series_uid"] = deid.uid(series_uid)
    try:
        pacs = connect(settings, via)
        try:
            _transfer(db, actor, pacs, deid, study_uid, series_uid, settings, via, report, progress)
        finally:
            pacs.close()
    except (PacsError, InvalidInput) as exc:
        if report.listed == 0:  # nothing was listed (wrong credentials, server down, no such study): one line
            _audit(db, actor, Action.PACS_RETRIEVE, None, {**details, "error": str(exc)}, "failed")
            raise
        report.stopped = str(exc)
    with contextlib.suppress(NotFound):
        report.stored_study_id = study_id_for(db, report.study_uid)
    if report.listed == 0 and report.complete:
        message = "the PACS lists no instances for that study (check the UID with `medvqa pacs find`)"
        _audit(db, actor, Action.PACS_RETRIEVE, None, {**details, "error": message}, "failed")
        raise NotFound(message)
    summary = {key: value for key, value in report.as_dict().items() if key not in ("files", "study_uid")}
    outcome = "success" if report.complete else "failed"
    study_id = report.study_ids[0] if report.study_ids else None
    _audit(db, actor, Action.PACS_RETRIEVE, study_id, {**details, **summary}, outcome)
    return report


def _transfer(
    db: Database,
    actor: Actor,
    pacs: Pacs,
    deid: Deidentifier,
    study_uid: str,
    series_uid: str | None,
    settings: Settings,
    via: Via,
    report: RetrieveReport,
    progress: Progress | None,
) -> None:
    instances = pacs.list_instances(study_uid, series_uid)
    if len(instances) > settings.import_max_instances:
        raise InvalidInput(
            f"the PACS lists {len(instances)} instances for this study, more than MEDVQA_IMPORT_MAX_INSTANCES "
            f"({settings.import_max_instances}): retrieve it series by series (--series)"
        )
    report.listed = len(instances)
    ours = {i.sop_uid: deid.uid(i.sop_uid) for i in instances}  # the de-identified UID each one is stored under
    stored = stored_instance_uids(db, set(ours.values()))
    wanted = [i for i in instances if ours[i.sop_uid] not in stored]
    report.already_stored = len(instances) - len(wanted)
    names = _names(instances)
    done = 0
    if progress:
        progress(0, len(wanted))
    batches = _batches(wanted)
    # The next batch downloads while this one is imported; a failed download (PacsError) surfaces when its
    # batch is reached, after every earlier batch was imported and committed.
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="medvqa-pacs-fetch") as downloader,
        worker_pool(settings) as pool,
    ):
        upcoming = downloader.submit(pacs.fetch_many, batches[0]) if batches else None
        for number, batch in enumerate(batches):
            assert upcoming is not None
            received = upcoming.result()
            upcoming = downloader.submit(pacs.fetch_many, batches[number + 1]) if number + 1 < len(batches) else None
            named = [Received(names[i.sop_uid], r.data, r.refused) for i, r in zip(batch, received, strict=True)]
            imported = import_received(db, actor, named, settings, via, pool)
            report.outcomes.extend(imported.outcomes)
            done += len(batch)
            if progress:
                progress(done, len(wanted))


def _batches(instances: list[RemoteInstance]) -> list[list[RemoteInstance]]:
    return [instances[start : start + BATCH_INSTANCES] for start in range(0, len(instances), BATCH_INSTANCES)]


def _names(instances: list[RemoteInstance]) -> dict[str, str]:
    """'series 2, instance 14 of 120': how the report names an instance, without the PACS's UIDs."""
    series_order: dict[str, int] = {}
    per_series: dict[str, int] = {}
    for instance in instances:
        series_order.setdefault(instance.series_uid, len(series_order) + 1)
        per_series[instance.series_uid] = per_series.get(instance.series_uid, 0) + 1
    names: dict[str, str] = {}
    position: dict[str, int] = {}
    for instance in instances:
        position[instance.series_uid] = position.get(instance.series_uid, 0) + 1
        names[instance.sop_uid] = (
            f"series {series_order[instance.series_uid]}, instance {position[instance.series_uid]} "
            f"of {per_series[instance.series_uid]}"
        )
    return names


def _keyed_filters(deid: Deidentifier, query: StudyQuery) -> dict[str, str]:
    """The search's filters as the trail keeps them: identifiers and dates keyed, the modality in clear."""
    filters: dict[str, str] = {}
    if query.patient_id:
        filters["patient_id_keyed"] = deid.keyed("pacs-patient-id", query.patient_id)
    if query.accession:
        filters["accession_keyed"] = deid.keyed("pacs-accession", query.accession)
    if query.dicom_date_range:
        filters["date_keyed"] = deid.keyed("pacs-date", query.dicom_date_range)
    if query.modality:
        filters["modality"] = query.modality
    return filters


def _audit(
    db: Database, actor: Actor, action: str, object_id: int | None, details: dict[str, Any], outcome: str = "success"
) -> None:
    write(db, lambda session: audit.record(session, actor, action, "pacs", object_id, outcome=outcome, details=details))
