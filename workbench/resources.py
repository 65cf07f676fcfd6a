"""Process-wide resources behind `st.cache_resource`: settings, the database engine, the model, series volumes.

Each cached builder is keyed by the settings it was built from, so a changed configuration (or a test pointing
at another database) gets its own engine and model rather than a stale one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import streamlit as st

from medvqa.config import Settings, load_settings
from medvqa.db.engine import Database
from medvqa.errors import MedVQAError
from medvqa.services.audit import Actor

if TYPE_CHECKING:
    from medvqa.imaging.series import Series
    from medvqa.services.ask import ServingModel


def settings() -> Settings:
    """The settings, or one error line on the page and a stop (a wrong MEDVQA_* value)."""
    try:
        return load_settings()
    except MedVQAError as exc:
        st.error(f"configuration: {exc}")
        st.stop()


def database() -> Database:
    """The database engine, or one error line on the page and a stop (unreachable or not migrated)."""
    from sqlalchemy.exc import OperationalError

    current = settings()
    url = current.sqlalchemy_url.render_as_string(hide_password=False)
    try:
        anchor = (str(current.audit_anchor_path), str(current.audit_anchor_key_path))
        return _database(url, anchor, current.sqlite_busy_timeout_ms, current.write_retries)
    except MedVQAError as exc:
        st.error(f"database: {exc}")
    except OperationalError as exc:
        st.error(f"cannot use the database: {str(exc.orig).strip().splitlines()[0]}")
    st.stop()


@st.cache_resource(show_spinner=False)
def _database(url: str, anchor: tuple[str, str], busy_timeout_ms: int, write_retries: int) -> Database:
    from compliance.audit_chain import AuditAnchor
    from medvqa.config import normalize_database_url
    from medvqa.db.engine import build_engine
    from medvqa.db.migrate import ensure_current

    audit_anchor = AuditAnchor(Path(anchor[0]), Path(anchor[1]))
    db = Database(build_engine(normalize_database_url(url), busy_timeout_ms), audit_anchor, write_retries)
    ensure_current(db)
    return db


def model() -> ServingModel:
    """The answering model with the live adapter; reloaded when another adapter goes live."""
    from medvqa.services.ask import live_adapter_id

    current, db = settings(), database()
    base = str(current.base_model or "")
    return _model(str(db.engine.url), base, current.device, live_adapter_id(db))


@st.cache_resource(show_spinner="Loading the model...", max_entries=2)
def _model(url: str, base_model: str, device: str, adapter_id: int | None) -> ServingModel:
    from medvqa.services.ask import load_answering_model

    return load_answering_model(database(), settings())


def volume(actor: Actor, series_id: int) -> Series:
    """A series' volume, read from the store once and kept: scrolling and windowing never reload it."""
    db = database()
    return _volume(db, str(db.engine.url), actor.name, actor.role, actor.user_id, series_id)


@st.cache_resource(show_spinner="Reading the series...", max_entries=8)
def _volume(_db: Database, url: str, name: str, role: str, user_id: int | None, series_id: int) -> Series:
    from medvqa.services.images import load_series

    return load_series(_db, Actor(name, role, user_id), series_id, settings())


def forget_volumes() -> None:
    """Drop every cached volume (after pixel cleaning replaced a stored file)."""
    _volume.clear()
