"""Images for the model and the viewer: a stored series as a volume, the exact model input, and the
reviewer's decision on held instances: confirm that they carry no burned-in identifying text, or have the text
regions the detector found blacked out (pixel cleaning, PS3.15 Clean Pixel Data Option)."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import Any

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session

from compliance.deid import CLEAN_PIXEL_DATA_CODE, ZERO_PREAMBLE, fresh_file_meta, method_codes
from compliance.policy import Action
from medvqa.config import Settings
from medvqa.db import Instance, Series
from medvqa.db.base import utcnow
from medvqa.db.engine import Database
from medvqa.errors import HeldForReview, InvalidInput, NotFound
from medvqa.imaging.burned_in import TextBox, black_out
from medvqa.imaging.model_input import ModelInput, to_model_input
from medvqa.imaging.series import Series as SeriesVolume
from medvqa.imaging.series import Window, read_series_files
from medvqa.imaging.store import ContentStore
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.transaction import write

log = logging.getLogger(__name__)


def load_series(db: Database, actor: Actor, series_id: int, settings: Settings) -> SeriesVolume:
    """The series' de-identified instances, read from the store and assembled into a volume."""
    authorize(db, actor, Action.STUDY_VIEW, "series", series_id)
    with db.read_session() as session:
        if session.get(Series, series_id) is None:
            raise NotFound(f"series {series_id} does not exist")
        paths = session.scalars(select(Instance.storage_path).where(Instance.series_id == series_id)).all()
    store = ContentStore(settings.store_dir)
    return read_series_files([store.path(p) for p in paths])


def model_input(
    db: Database,
    actor: Actor,
    series_id: int,
    settings: Settings,
    slices: int | Sequence[int] | None = None,
    window: str | Window | None = None,
    size: int = 384,
) -> ModelInput:
    """What the model will see; refused while any instance it shows is held for a burned-in text check."""
    volume = load_series(db, actor, series_id, settings)
    prepared = to_model_input(volume, slices, window, size)
    uids = set(prepared.selection["instance_uids"])
    with db.read_session() as session:
        held = session.scalars(
            select(Instance.id).where(
                Instance.sop_instance_uid.in_(uids),
                Instance.held_for_burned_in_text.is_(True),
                Instance.burned_in_confirmed_by.is_(None),
            )
        ).all()
    if held:
        raise HeldForReview(
            f"instance(s) {', '.join(map(str, held))} may carry burned-in text: a reviewer must confirm them first"
        )
    return prepared


def confirm_no_burned_in_text(db: Database, actor: Actor, instance_ids: Sequence[int]) -> list[int]:
    """A reviewer looked at the held instances and found no identifying text burned into the pixels."""
    authorize(db, actor, Action.INSTANCE_CONFIRM, "instance", ",".join(map(str, instance_ids)))

    def work(session: Session) -> list[int]:
        rows = session.scalars(select(Instance).where(Instance.id.in_(instance_ids))).all()
        missing = set(instance_ids) - {row.id for row in rows}
        if missing:
            raise NotFound(f"instance(s) {sorted(missing)} do not exist")
        confirmed = [row.id for row in rows if row.held_for_burned_in_text and row.burned_in_confirmed_by is None]
        for row in rows:
            if row.id in confirmed:
                row.burned_in_confirmed_by = actor.user_id
        details = {"instances": sorted(confirmed), "meaning": "no burned-in identifying text"}
        audit.record(session, actor, Action.INSTANCE_CONFIRM, "instance", None, details=details)
        return sorted(confirmed)

    return write(db, work)


def clean_burned_in_text(
    db: Database, actor: Actor, settings: Settings, instance_id: int, boxes: Sequence[TextBox] | None = None
) -> dict[str, Any]:
    """Black out the text regions of a held instance (the detector's boxes unless `boxes` are given): a new
    de-identified file with those regions filled, BurnedInAnnotation NO and the Clean Pixel Data Option code
    replaces the stored one; the instance records which boxes, by whom, when and the new pixel hash, the hold
    is released, and the old file (which shows the text) is deleted. Returns that provenance record."""
    from medvqa.imaging.importer import hash_pixels
    from medvqa.imaging.pixel_data import store_native
    from medvqa.imaging.reader import decode_pixels

    authorize(db, actor, Action.INSTANCE_CLEAN, "instance", instance_id)
    with db.read_session() as session:
        row = session.get(Instance, instance_id)
        if row is None:
            raise NotFound(f"instance {instance_id} does not exist")
        old_path, detected = row.storage_path, row.burned_in_text or {}
        _check_still_held(row)
    chosen = list(boxes) if boxes is not None else [TextBox(**box) for box in detected.get("boxes", [])]
    if not chosen:
        raise InvalidInput(
            f"instance {instance_id} has no detected text regions to black out; confirm it or give the regions"
        )
    store = ContentStore(settings.store_dir)
    dataset = pydicom.dcmread(store.path(old_path))
    _check_boxes(chosen, int(dataset.Rows), int(dataset.Columns), int(dataset.get("NumberOfFrames") or 1))
    samples = int(dataset.get("SamplesPerPixel") or 1)
    cleaned = black_out(decode_pixels(dataset), chosen, samples)
    new_hash = hash_pixels(cleaned)
    dataset.file_meta = fresh_file_meta(dataset, "1.2.840.10008.1.2.1")  # Explicit VR Little Endian
    store_native(dataset, cleaned)
    dataset.BurnedInAnnotation = "NO"
    retained_dates = any(i.get("CodeValue") == "113107" for i in dataset.get("DeidentificationMethodCodeSequence", []))
    dataset.DeidentificationMethodCodeSequence = method_codes(retained_dates, pixels_cleaned=True)
    dataset.preamble = ZERO_PREAMBLE
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    new_path = store.put(buffer.getvalue())
    store.sync()
    record = {
        "boxes": [box.as_dict() for box in chosen],
        "by": actor.user_id,
        "by_name": actor.name,
        "at": utcnow().isoformat(),
        "pixel_hash": new_hash,
        "option": dict(zip(("code", "scheme", "meaning"), CLEAN_PIXEL_DATA_CODE, strict=True)),
    }

    def work(session: Session) -> None:
        current = session.get(Instance, instance_id)
        if current is None:
            raise NotFound(f"instance {instance_id} does not exist")
        _check_still_held(current)
        if current.storage_path != old_path:
            raise InvalidInput(f"instance {instance_id} changed meanwhile; look at it again")
        current.storage_path, current.pixel_cleaning = new_path, record
        current.burned_in_confirmed_by = actor.user_id
        details = {"boxes": len(chosen), "pixel_hash": new_hash, "option": CLEAN_PIXEL_DATA_CODE[0]}
        audit.record(session, actor, Action.INSTANCE_CLEAN, "instance", instance_id, details=details)

    try:
        write(db, work)
    except BaseException:
        _discard_unreferenced(db, store, new_path)
        raise
    _discard_unreferenced(db, store, old_path)
    return record


def _check_still_held(row: Instance) -> None:
    if not row.held_for_burned_in_text or row.burned_in_confirmed_by is not None:
        raise InvalidInput(f"instance {row.id} is not held for a burned-in text check")


def _check_boxes(boxes: Sequence[TextBox], rows: int, columns: int, frames: int) -> None:
    for box in boxes:
        inside = 0 <= box.left < columns and 0 <= box.top < rows and 0 <= box.frame < frames
        if not inside or box.width < 1 or box.height < 1:
            raise InvalidInput(f"a text region lies outside the {columns} x {rows} image")


def _discard_unreferenced(db: Database, store: ContentStore, relative: str) -> None:
    """Delete a stored file no instance points at (the text it showed must not stay on disk)."""
    with db.read_session() as session:
        used = session.scalar(select(Instance.id).where(Instance.storage_path == relative).limit(1))
    if used is None:
        try:
            store.path(relative).unlink(missing_ok=True)
        except OSError as exc:
            log.error("could not delete a superseded stored file: %s", type(exc).__name__)
