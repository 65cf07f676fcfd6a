"""Process-wide resources behind `st.cache_resource`: settings, the database engine, the model, series volumes.

Each cached builder is keyed by the settings it was built from, so a changed configuration (or a test pointing
at another database) gets its own engine and model rather than a stale one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import streamlit as st

from medvqa.config import Settings, load_settings
from medvqa.errors import MedVQAError
from medvqa.services.audit import Actor

if TYPE_CHECKING:
    from medvqa.imaging.series import Series
    from medvqa.services.ask import ServingModel
    from medvqa.services.database import Database


def settings() -> Settings:
    """The settings, or one error line on the page and a stop (a wrong MEDVQA_* value)."""
    try:
        return load_settings()
    except MedVQAError as exc:
        st.error(f"configuration: {exc}")
        st.stop()


def database() -> Database:
    """The database engine, or one error line on the page and a stop (unreachable or not migrated)."""
    from medvqa.services.database import database_error

    current = settings()
    url = current.sqlalchemy_url.render_as_string(hide_password=False)
    try:
        anchor = (str(current.audit_anchor_path), str(current.audit_anchor_key_path))
        return _database(url, anchor, current.sqlite_busy_timeout_ms, current.write_retries)
    except MedVQAError as exc:
        st.error(f"database: {exc}")
    except Exception as exc:
        message = database_error(exc)
        if message is None:
            raise
        st.error(message)
    st.stop()


@st.cache_resource(show_spinner=False)
def _database(url: str, anchor: tuple[str, str], busy_timeout_ms: int, write_retries: int) -> Database:
    from medvqa.services.database import open_url

    paths = (Path(anchor[0]), Path(anchor[1]))
    return open_url(url, paths, busy_timeout_ms=busy_timeout_ms, write_retries=write_retries)


def model() -> ServingModel:
    """The answering model with the live adapter; reloaded when another adapter goes live."""
    from medvqa.services.ask import live_adapter_id
    from medvqa.services.database import database_url

    current, db = settings(), database()
    base = str(current.base_model or "")
    return _model(database_url(db), base, current.device, live_adapter_id(db))


@st.cache_resource(show_spinner="Loading the model...", max_entries=2)
def _model(url: str, base_model: str, device: str, adapter_id: int | None) -> ServingModel:
    from medvqa.services.ask import load_answering_model

    return load_answering_model(database(), settings())


def volume(actor: Actor, series_id: int) -> Series:
    """A series' volume, read from the store once and kept: scrolling and windowing never reload it."""
    from medvqa.services.database import database_url

    db = database()
    return _volume(db, database_url(db), actor.name, actor.role, actor.user_id, series_id)


@st.cache_resource(show_spinner="Reading the series...", max_entries=8)
def _volume(_db: Database, url: str, name: str, role: str, user_id: int | None, series_id: int) -> Series:
    from medvqa.services.images import load_series

    return load_series(_db, Actor(name, role, user_id), series_id, settings())


def forget_volumes() -> None:
    """Drop every cached volume (after pixel cleaning replaced a stored file)."""
    _volume.clear()
