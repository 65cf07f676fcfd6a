"""Importing studies (de-identified, stored once, one audit event per study) and listing them."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import Integer, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session

from compliance.deid import Deidentifier, DeidSettings, load_site_key
from compliance.policy import Action
from medvqa.config import Settings
from medvqa.db import Instance, Series, Study
from medvqa.db.engine import Database
from medvqa.errors import DatabaseError
from medvqa.imaging.frames import is_colour
from medvqa.imaging.importer import InstanceRecord
from medvqa.imaging.reader import ImportLimits, one_line
from medvqa.imaging.sources import Item, Listed, Source, open_sources
from medvqa.imaging.store import ContentStore, StoreLock
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.preparation import FileOutcome, Preparer, Status, WorkerPool, unexpected
from medvqa.services.transaction import write

STATUSES: tuple[Status, ...] = ("imported", "duplicate", "refused", "skipped")
log = logging.getLogger(__name__)


@dataclass
class ImportReport:
    outcomes: list[FileOutcome] = field(default_factory=list)
    left_in_store: int = 0  # unreferenced files this import wrote but could not remove (another import was running)
    swept: int = 0  # unreferenced files an earlier, interrupted import had left, removed before this one began

    def count(self, status: Status) -> int:
        return sum(1 for outcome in self.outcomes if outcome.status == status)

    @property
    def study_ids(self) -> list[int]:
        return sorted({o.study_id for o in self.outcomes if o.study_id is not None})

    def as_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {status: self.count(status) for status in STATUSES}
        return {
            **counts,
            "held": sum(o.held for o in self.outcomes),
            "studies": self.study_ids,
            "left_in_store": self.left_in_store,
            "swept_after_interrupted_import": self.swept,
            "files": [{**vars(o), "line": o.line()} for o in self.outcomes],
        }


def import_limits(settings: Settings) -> ImportLimits:
    return ImportLimits(settings.import_max_file_bytes, settings.import_max_pixels, settings.import_max_instances)


def build_deidentifier(settings: Settings) -> Deidentifier:
    key = load_site_key(settings.deid_key_path)
    return Deidentifier(DeidSettings(key, settings.deid_retain_longitudinal_dates))


def import_paths(db: Database, actor: Actor, paths: Sequence[Path], settings: Settings) -> ImportReport:
    """Import every input under `paths`; each gets one outcome. Whatever goes wrong with one input (a hostile
    file, a failed database write for its study) refuses that input and the rest goes on; files written for
    instances that end up without a row are removed. Only a store or settings failure before the first input
    (or more inputs than MEDVQA_IMPORT_MAX_INSTANCES) stops the import, with one MedVQAError."""
    authorize(db, actor, Action.STUDY_IMPORT, "study")
    return _run_import(db, actor, settings, lambda limits: open_sources(paths, limits))


def import_received(
    db: Database,
    actor: Actor,
    received: Sequence[Received],
    settings: Settings,
    via: str,
    pool: WorkerPool | None = None,
) -> ImportReport:
    """Import instances that arrived over the network (retrieved from a PACS, or sent to `medvqa listen`)
    through the same path as files: checks, de-identification, store, one audit event per study (its details
    say `via`). The caller has authorised its own action (a PACS retrieve, a listener's association).
    `pool`: worker processes kept across calls (see `worker_pool`)."""
    items: list[Item] = [_received_source(item) for item in received]
    return _run_import(db, actor, settings, lambda _limits: contextlib.nullcontext(items), via, pool)


@dataclass(frozen=True)
class Received:
    """One instance's bytes as they arrived, under a name for the report (never a PACS identifier), or why it
    was refused before it could be read (too large)."""

    name: str
    data: bytes
    refused: str = ""


def _received_source(item: Received) -> Item:
    if item.refused:
        return Listed(item.name, "refused", item.refused)
    data = item.data
    return Source(item.name, len(data), lambda limit: data[: limit + 1])


def worker_pool(settings: Settings) -> WorkerPool:
    """Worker processes for several `import_received` calls with these settings (a retrieve's batches), so
    they start once; a context manager. Unused when MEDVQA_IMPORT_WORKERS is 1 or a batch is small."""
    deid = build_deidentifier(settings)
    preparer = Preparer(deid.settings, ContentStore(settings.store_dir).root, import_limits(settings))
    return WorkerPool(preparer, settings.import_workers_count)


def stored_instance_uids(db: Database, uids: set[str]) -> set[str]:
    """Those of the (de-identified) SOP Instance UIDs that the database already holds."""
    return _held_values(db, Instance.sop_instance_uid, uids)


def _run_import(
    db: Database,
    actor: Actor,
    settings: Settings,
    open_items: Callable[[ImportLimits], AbstractContextManager[list[Item]]],
    via: str = "",
    pool: WorkerPool | None = None,
) -> ImportReport:
    limits = import_limits(settings)
    deid, store = build_deidentifier(settings), ContentStore(settings.store_dir)
    report = ImportReport()
    with store.lock() as lock:
        report.swept = _sweep_after_interrupted_import(db, store, lock)
        with store.import_marker() as marker, open_items(limits) as items:
            workers = settings.import_workers_count
            _import_items(db, actor, items, deid, store, limits, report, via, workers, pool)
            report.left_in_store = _remove_unreferenced(db, store, lock)
            marker.keep = report.left_in_store > 0  # the next import that runs alone sweeps them
    return report


def _import_items(
    db: Database,
    actor: Actor,
    items: list[Item],
    deid: Deidentifier,
    store: ContentStore,
    limits: ImportLimits,
    report: ImportReport,
    via: str = "",
    workers: int = 1,
    pool: WorkerPool | None = None,
) -> None:
    preparer = Preparer(deid.settings, store.root, limits)
    by_study: dict[str, list[tuple[FileOutcome, InstanceRecord]]] = defaultdict(list)
    for outcome, record in preparer.prepare_all(items, store, workers, pool):
        report.outcomes.append(outcome)
        if record is not None:
            by_study[record.study_uid].append((outcome, record))
    store.sync()  # the files must be on disk before any row points at them
    for study_items in by_study.values():
        _save_study(db, actor, store, study_items, via)


def _sweep_after_interrupted_import(db: Database, store: ContentStore, lock: StoreLock) -> int:
    """An import killed mid-way left its marker, and perhaps files no row references: when no other import is
    running (the lock can be taken exclusively), remove them before this import begins. Returns how many."""
    if not store.has_markers() or not lock.try_exclusive():
        return 0
    try:
        content, leftovers, _ = store.scan()
        removed = store.remove_unreferenced(content, all_referenced_paths(db))
        for relative in leftovers:
            store.remove_leftover(relative)
        if removed:
            log.info("import: removed %d unreferenced store file(s) left by an interrupted import", len(removed))
        return len(removed)
    except Exception as exc:  # the sweep is housekeeping: the import goes on, `store check --prune` remains
        log.warning("import: could not sweep after an interrupted import (%s)", type(exc).__name__)
        return 0
    finally:
        lock.share()


def all_referenced_paths(db: Database) -> set[str]:
    with db.read_session() as session:
        return set(session.scalars(select(Instance.storage_path)))


def _save_study(
    db: Database, actor: Actor, store: ContentStore, items: list[tuple[FileOutcome, InstanceRecord]], via: str = ""
) -> None:
    """Write one study's rows and audit event in one transaction; when it fails, its inputs are refused (their
    files are removed at the end of the import)."""
    records = [record for _, record in items]
    reason = ""
    for attempt in range(2):
        try:
            study_id, decisions = write(db, lambda session: _write_study(session, actor, store, records, via))
            break
        except IntegrityError as exc:
            # A concurrent import may have inserted the same study, series or instance first: once more, it now
            # finds them; a second refusal is the database's own (a constraint or a trigger).
            first_line = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
            reason = f"the database refused the write: {one_line(first_line)[:300]}"
            if attempt == 0:
                continue
        except DatabaseError as exc:
            reason = one_line(str(exc))
        except Exception as exc:
            reason = unexpected(exc)
        for outcome, _ in items:
            outcome.status, outcome.reason, outcome.held = "refused", reason, False
        return
    for (outcome, _), (status, why) in zip(items, decisions, strict=True):
        outcome.status, outcome.reason = status, why
        outcome.study_id = study_id if status != "refused" else None
        outcome.held = outcome.held and status == "imported"


Decision = tuple[Status, str]


def _write_study(
    session: Session, actor: Actor, store: ContentStore, records: list[InstanceRecord], via: str = ""
) -> tuple[int | None, list[Decision]]:
    """Study, series and new instances, and one audit event: all in the caller's transaction. An instance is
    refused here when the series it names belongs to another study, or when its image size or colour differs
    from the rest of its series (the series could not be shown as one volume)."""
    first = records[0]
    study = session.scalars(select(Study).where(Study.study_uid == first.study_uid)).one_or_none()
    wanted = {r.sop_instance_uid for r in records}
    existing = set(session.scalars(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(wanted))))
    series_rows: dict[str, Series | None] = {}
    expected: dict[str, tuple[int, int, bool] | None] = {}
    decisions: list[Decision] = []
    accepted: list[InstanceRecord] = []
    accepted_uids: set[str] = set()
    majority = _majority_shapes(records)
    for record in records:
        if record.sop_instance_uid in existing or record.sop_instance_uid in accepted_uids:
            decisions.append(("duplicate", ""))  # a second copy within this import is a duplicate
            continue
        if record.series_uid not in series_rows:
            series = session.scalars(select(Series).where(Series.series_uid == record.series_uid)).one_or_none()
            series_rows[record.series_uid] = series
            stored = _stored_shape(session, store, series) if series is not None else None
            expected[record.series_uid] = stored or majority[record.series_uid]
        series = series_rows[record.series_uid]
        if series is not None and (study is None or series.study_id != study.id):
            decisions.append(("refused", "its series belongs to another study"))
            continue
        shape, wanted_shape = _shape(record), expected[record.series_uid]
        if wanted_shape is not None and shape != wanted_shape:
            differs = f"{_shape_text(shape)} differs from the rest of its series ({_shape_text(wanted_shape)})"
            decisions.append(("refused", differs))
            continue
        accepted.append(record)
        accepted_uids.add(record.sop_instance_uid)
        decisions.append(("imported", ""))
    if study is None and not accepted:
        return None, decisions
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
    series_ids: dict[str, int] = {}
    for record in accepted:
        series_id = series_ids.get(record.series_uid) or _series_id(session, study.id, record)
        series_ids[record.series_uid] = series_id
        session.add(_instance(series_id, record))
    session.flush()
    details = {
        "instances_new": len(accepted),
        "instances_already_stored": sum(status == "duplicate" for status, _ in decisions),
        "instances_refused": sum(status == "refused" for status, _ in decisions),
        "held_for_burned_in_text": sum(r.held_for_burned_in_text for r in accepted),
        "values_corrected": sum(r.values_corrected for r in accepted),
        "series": sorted(series_ids),
    }
    if via:
        details["via"] = via
    audit.record(session, actor, Action.STUDY_IMPORT, "study", study.id, details=details)
    return study.id, decisions


def _shape(record: InstanceRecord) -> tuple[int, int, bool]:
    return (record.rows, record.columns, record.colour)


def _majority_shapes(records: list[InstanceRecord]) -> dict[str, tuple[int, int, bool] | None]:
    """Per series, the shape most of this import's instances have (the first seen among equals): one odd file
    is refused, not the rest of its series because the odd one happened to come first."""
    counts: dict[str, Counter[tuple[int, int, bool]]] = defaultdict(Counter)
    for record in records:
        counts[record.series_uid][_shape(record)] += 1
    return {uid: shapes.most_common(1)[0][0] for uid, shapes in counts.items()}


def _shape_text(shape: tuple[int, int, bool]) -> str:
    rows, columns, colour = shape
    return f"{'colour' if colour else 'grey'} {columns} x {rows} image"


def _stored_shape(session: Session, store: ContentStore, series: Series) -> tuple[int, int, bool] | None:
    """(rows, columns, colour) of an instance the series already holds (colour read from its stored header)."""
    row = session.execute(
        select(Instance.rows, Instance.columns, Instance.storage_path).where(Instance.series_id == series.id).limit(1)
    ).first()
    if row is None:
        return None
    try:
        header = pydicom.dcmread(store.path(row.storage_path), stop_before_pixels=True)
        colour = is_colour(header)
    except Exception:  # an unreadable stored file: compare the size alone
        return None
    return (row.rows, row.columns, colour)


def _remove_unreferenced(db: Database, store: ContentStore, lock: StoreLock) -> int:
    """Remove the files this import wrote that no row references (refused after storing, or their study's write
    failed). Only when no other import holds the store (it may be about to reference the same content); the
    number left is reported, and `medvqa store check --prune` removes them later."""
    if not store.created:
        return 0
    try:
        unreferenced = store.created - referenced_paths(db, store.created)
        if not unreferenced:
            return 0
        if not lock.try_exclusive():
            return len(unreferenced)
        store.remove_unreferenced(unreferenced, referenced_paths(db, unreferenced))
    except Exception as exc:  # the database went away: leave the files for `medvqa store check --prune`
        log.warning("import: could not remove unreferenced store files (%s)", type(exc).__name__)
        return len(store.created)
    return 0


def referenced_paths(db: Database, paths: set[str]) -> set[str]:
    """Those of `paths` that an instance row references."""
    return _held_values(db, Instance.storage_path, paths)


def _held_values(db: Database, column: InstrumentedAttribute[str], values: set[str]) -> set[str]:
    """Those of `values` that `column` holds, asked 500 at a time (a bounded IN list on both backends)."""
    found: set[str] = set()
    ordered = sorted(values)
    with db.read_session() as session:
        for start in range(0, len(ordered), 500):
            found.update(session.scalars(select(column).where(column.in_(ordered[start : start + 500]))))
    return found


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
