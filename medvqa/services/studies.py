"""Importing studies (de-identified, stored once, one audit event per study) and listing them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Integer, func, select
from sqlalchemy.orm import Session

from compliance.deid import Deidentifier, DeidSettings, load_site_key
from compliance.policy import Action
from medvqa.config import Settings
from medvqa.db import Instance, Series, Study
from medvqa.db.engine import Database
from medvqa.errors import DatabaseError, ImportRefused, ImportSkipped
from medvqa.imaging.importer import InstanceRecord, prepare_instance
from medvqa.imaging.reader import ImportLimits
from medvqa.imaging.sources import list_sources, read_bounded
from medvqa.imaging.store import ContentStore
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.transaction import write

Status = Literal["imported", "duplicate", "refused", "skipped"]


@dataclass
class FileOutcome:
    source: str
    status: Status
    reason: str = ""
    study_id: int | None = None
    held: bool = False
    values_corrected: int = 0  # retained values replaced or removed as invalid for their VR (never the values)


@dataclass
class ImportReport:
    outcomes: list[FileOutcome] = field(default_factory=list)

    def count(self, status: Status) -> int:
        return sum(1 for outcome in self.outcomes if outcome.status == status)

    @property
    def study_ids(self) -> list[int]:
        return sorted({o.study_id for o in self.outcomes if o.study_id is not None})

    def as_dict(self) -> dict[str, Any]:
        counts = {status: self.count(status) for status in ("imported", "duplicate", "refused", "skipped")}
        return {
            **counts,
            "held": sum(o.held for o in self.outcomes),
            "studies": self.study_ids,
            "files": [vars(o) for o in self.outcomes],
        }


def import_limits(settings: Settings) -> ImportLimits:
    return ImportLimits(settings.import_max_file_bytes, settings.import_max_pixels, settings.import_max_instances)


def build_deidentifier(settings: Settings) -> Deidentifier:
    key = load_site_key(settings.deid_key_path)
    return Deidentifier(DeidSettings(key, settings.deid_retain_longitudinal_dates))


def import_paths(db: Database, actor: Actor, paths: Sequence[Path], settings: Settings) -> ImportReport:
    """Import every file under `paths`. A bad file is refused with its reason and the rest goes on."""
    authorize(db, actor, Action.STUDY_IMPORT, "study")
    limits = import_limits(settings)
    deid, store = build_deidentifier(settings), ContentStore(settings.store_dir)
    report = ImportReport()
    prepared: dict[str, list[tuple[FileOutcome, InstanceRecord]]] = defaultdict(list)
    for source in list_sources(paths, limits):
        outcome = FileOutcome(source.name, "imported")
        try:
            record = prepare_instance(read_bounded(source, limits), deid, store, limits)
        except ImportSkipped as exc:
            outcome.status, outcome.reason = "skipped", str(exc)
        except ImportRefused as exc:
            outcome.status, outcome.reason = "refused", str(exc)
        else:
            outcome.held, outcome.values_corrected = record.held_for_burned_in_text, record.values_corrected
            prepared[record.study_uid].append((outcome, record))
        report.outcomes.append(outcome)
    store.sync()  # the files must be on disk before any row points at them
    for items in prepared.values():
        _save_study(db, actor, items)
    return report


def _save_study(db: Database, actor: Actor, items: list[tuple[FileOutcome, InstanceRecord]]) -> None:
    try:
        study_id, new_uids = write(db, lambda session: _write_study(session, actor, [r for _, r in items]))
    except DatabaseError as exc:
        for outcome, _ in items:
            outcome.status, outcome.reason = "refused", str(exc)
        return
    for outcome, record in items:
        outcome.study_id = study_id
        if record.sop_instance_uid in new_uids:
            new_uids.discard(record.sop_instance_uid)  # a second copy within this import is a duplicate
        else:
            outcome.status = "duplicate"


def _write_study(session: Session, actor: Actor, records: list[InstanceRecord]) -> tuple[int, set[str]]:
    """Study, series and new instances, and one audit event: all in the caller's transaction."""
    first = records[0]
    study = session.scalars(select(Study).where(Study.study_uid == first.study_uid)).one_or_none()
    if study is None:
        study = Study(
            study_uid=first.study_uid,
            patient_pseudonym=first.patient_pseudonym,
            modality=first.modality,
            body_part=first.body_part,
            study_date=first.study_date,
            imported_by=actor.user_id,
        )
        session.add(study)
        session.flush()
    wanted = {r.sop_instance_uid for r in records}
    existing = set(session.scalars(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(wanted))))
    new_uids: set[str] = set()
    series_ids: dict[str, int] = {}
    for record in records:
        if record.sop_instance_uid in existing or record.sop_instance_uid in new_uids:
            continue
        series_id = series_ids.get(record.series_uid) or _series_id(session, study.id, record)
        series_ids[record.series_uid] = series_id
        session.add(_instance(series_id, record))
        new_uids.add(record.sop_instance_uid)
    session.flush()
    details = {
        "instances_new": len(new_uids),
        "instances_already_stored": len(records) - len(new_uids),
        "held_for_burned_in_text": sum(r.held_for_burned_in_text for r in records if r.sop_instance_uid in new_uids),
        "values_corrected": sum(r.values_corrected for r in records if r.sop_instance_uid in new_uids),
        "series": sorted(series_ids),
    }
    audit.record(session, actor, Action.STUDY_IMPORT, "study", study.id, details=details)
    return study.id, set(new_uids)


def _series_id(session: Session, study_id: int, record: InstanceRecord) -> int:
    series = session.scalars(select(Series).where(Series.series_uid == record.series_uid)).one_or_none()
    if series is None:
        series = Series(
            study_id=study_id,
            series_uid=record.series_uid,
            modality=record.modality,
            series_number=record.series_number,
            spacing=record.spacing,
            default_window=record.window,
        )
        session.add(series)
        session.flush()
    return series.id


def _instance(series_id: int, record: InstanceRecord) -> Instance:
    return Instance(
        series_id=series_id,
        sop_instance_uid=record.sop_instance_uid,
        instance_number=record.instance_number,
        slice_position=record.slice_position,
        rows=record.rows,
        columns=record.columns,
        frames=record.frames,
        pixel_hash=record.pixel_hash,
        storage_path=record.storage_path,
        held_for_burned_in_text=record.held_for_burned_in_text,
        burned_in_text=record.burned_in_text or None,
        deid_report=record.deid_report or None,
    )


def list_studies(db: Database, actor: Actor) -> list[dict[str, Any]]:
    """De-identified study metadata with series and instance counts, newest import first."""
    authorize(db, actor, Action.STUDY_LIST, "study")
    with db.read_session() as session:
        counts = (
            select(
                Series.study_id,
                func.count(func.distinct(Series.id)).label("series"),
                func.count(Instance.id).label("instances"),
                func.sum(func.cast(Instance.held_for_burned_in_text, Integer)).label("held"),
            )
            .join(Instance, Instance.series_id == Series.id)
            .group_by(Series.study_id)
            .subquery()
        )
        rows = session.execute(
            select(Study, counts.c.series, counts.c.instances, counts.c.held)
            .join(counts, counts.c.study_id == Study.id)
            .order_by(Study.imported_at.desc(), Study.id.desc())
        ).all()
    return [
        {
            "id": s.id,
            "study_uid": s.study_uid,
            "patient": s.patient_pseudonym,
            "modality": s.modality,
            "body_part": s.body_part,
            "study_date": s.study_date.isoformat() if s.study_date else None,
            "imported_at": s.imported_at.isoformat(),
            "series": n_series,
            "instances": n_instances,
            "held": int(held or 0),
        }
        for s, n_series, n_instances, held in rows
    ]
