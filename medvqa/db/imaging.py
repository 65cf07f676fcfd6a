"""De-identified studies as stored: pseudonymised UIDs, pixel hashes, content-addressed storage paths."""

from __future__ import annotations

from datetime import date
from typing import Any

from sqlalchemy import JSON, Boolean, Date, Float, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from medvqa.db.base import Base, IntPK, JsonDict, Sha256, Timestamp, Uid


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[IntPK]
    study_uid: Mapped[Uid] = mapped_column(unique=True)
    patient_pseudonym: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str] = mapped_column(String(16))
    body_part: Mapped[str] = mapped_column(String(64), default="")
    description: Mapped[str] = mapped_column(String(256), default="")
    study_date: Mapped[date | None] = mapped_column(Date)
    imported_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    imported_at: Mapped[Timestamp]


class Series(Base):
    __tablename__ = "series"

    id: Mapped[IntPK]
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[Uid] = mapped_column(unique=True)
    modality: Mapped[str] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(String(256), default="")
    spacing: Mapped[JsonDict]
    default_window: Mapped[JsonDict]


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[IntPK]
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[Uid] = mapped_column(unique=True)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    slice_position: Mapped[float | None] = mapped_column(Float)
    rows: Mapped[int] = mapped_column(Integer)
    columns: Mapped[int] = mapped_column(Integer)
    frames: Mapped[int] = mapped_column(Integer, default=1)
    pixel_hash: Mapped[Sha256] = mapped_column(index=True)
    storage_path: Mapped[str] = mapped_column(String(512))
    held_for_burned_in_text: Mapped[bool] = mapped_column(Boolean, default=False)
    burned_in_confirmed_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    # The OCR detector's word boxes and confidences (never the recognised text), or None when it did not run.
    burned_in_text: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Provenance of a reviewer's pixel cleaning: boxes, by whom, when, the new pixel hash, the option code.
    pixel_cleaning: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # De-identification counts: values replaced or removed as invalid for their VR (by keyword), elements dropped.
    deid_report: Mapped[dict[str, Any] | None] = mapped_column(JSON)
