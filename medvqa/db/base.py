"""Declarative base, constraint naming convention, and the column types every model shares."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

from sqlalchemy import JSON, BigInteger, DateTime, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets BIGINT.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


IntPK = Annotated[int, mapped_column(BigIntId, primary_key=True)]
Timestamp = Annotated[datetime, mapped_column(DateTime(timezone=True), default=utcnow)]
OptionalTimestamp = Annotated[datetime | None, mapped_column(DateTime(timezone=True))]
Name = Annotated[str, mapped_column(String(128))]
Uid = Annotated[str, mapped_column(String(64))]  # DICOM UIDs are at most 64 characters
Sha256 = Annotated[str, mapped_column(String(64))]
LongText = Annotated[str, mapped_column(Text)]
JsonDict = Annotated[dict[str, Any], mapped_column(JSON, default=dict)]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {int: BigIntId}
