"""Images for the model and the viewer: a stored series as a volume, the exact model input, and the
reviewer's confirmation that held instances carry no burned-in identifying text."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from compliance.policy import Action
from medvqa.config import Settings
from medvqa.db import Instance, Series
from medvqa.db.engine import Database
from medvqa.errors import HeldForReview, NotFound
from medvqa.imaging.model_input import ModelInput, to_model_input
from medvqa.imaging.series import Series as SeriesVolume
from medvqa.imaging.series import Window, read_series_files
from medvqa.imaging.store import ContentStore
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.transaction import write


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
