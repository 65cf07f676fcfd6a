"""What a PACS search asks and answers, the same for DICOMweb (QIDO-RS) and DIMSE (C-FIND).

The values here are the PACS's own identifiers (Study Instance UIDs, patient IDs, accession numbers): they are
shown to the person who searched, for that search only, and never written to medvqa's database, logs or store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from medvqa.errors import InvalidInput

MAX_RESULTS = 500
_DATE_RANGE = re.compile(r"^(\d{8})?(-)?(\d{8})?$")
_MODALITY = re.compile(r"^[A-Z0-9_ ]{1,16}$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class StudyQuery:
    """A study-level search. `patient_id` and `accession` may use the DICOM wildcards * and ?."""

    patient_id: str | None = None
    accession: str | None = None
    modality: str | None = None
    date_from: date | None = None
    date_to: date | None = None
    limit: int = 50

    @classmethod
    def build(
        cls,
        patient_id: str | None = None,
        accession: str | None = None,
        modality: str | None = None,
        dates: str | None = None,
        limit: int = 50,
    ) -> StudyQuery:
        """Validated from what a person typed; a bad value is one InvalidInput line naming the field."""
        date_from, date_to = parse_date_range(dates)
        modality = (modality or "").strip().upper() or None
        if modality is not None and not _MODALITY.match(modality):
            raise InvalidInput("modality: a DICOM modality code such as CT, MR, CR, US (letters and digits)")
        if not 1 <= limit <= MAX_RESULTS:
            raise InvalidInput(f"limit: between 1 and {MAX_RESULTS}")
        patient_id, accession = _identifier("patient ID", patient_id), _identifier("accession number", accession)
        return cls(patient_id, accession, modality, date_from, date_to, limit)

    @property
    def dicom_date_range(self) -> str | None:
        if self.date_from is None and self.date_to is None:
            return None
        start = self.date_from.strftime("%Y%m%d") if self.date_from else ""
        end = self.date_to.strftime("%Y%m%d") if self.date_to else ""
        return start if start == end else f"{start}-{end}"

    def qido_filters(self) -> dict[str, Any]:
        filters: dict[str, Any] = {}
        if self.patient_id:
            filters["PatientID"] = self.patient_id
        if self.accession:
            filters["AccessionNumber"] = self.accession
        if self.modality:
            filters["ModalitiesInStudy"] = self.modality
        if self.dicom_date_range:
            filters["StudyDate"] = self.dicom_date_range
        return filters

    def is_empty(self) -> bool:
        return not self.qido_filters()


@dataclass(frozen=True)
class PacsStudy:
    """One study as the PACS lists it (its own Study Instance UID, shown for this search only)."""

    study_uid: str
    study_date: date | None
    modalities: tuple[str, ...]
    description: str
    instances: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "study_date": self.study_date.isoformat() if self.study_date else None,
            "modalities": list(self.modalities),
            "description": self.description,
            "instances": self.instances,
        }


@dataclass(frozen=True)
class RemoteInstance:
    """One instance to retrieve, by the PACS's UIDs."""

    study_uid: str
    series_uid: str
    sop_uid: str
    series_number: int = 0
    number: int = 0


@dataclass(frozen=True)
class Fetched:
    """One retrieved instance: its Part 10 bytes as they arrived, or why there are none (too large)."""

    data: bytes
    refused: str = ""


def parse_date_range(text: str | None) -> tuple[date | None, date | None]:
    """'20240101-20240131', '20240101' (that day), '20240101-' (from), '-20240131' (until)."""
    text = (text or "").strip()
    if not text:
        return None, None
    match = _DATE_RANGE.match(text)
    if not match or not (match.group(1) or match.group(3)):
        raise InvalidInput("date: YYYYMMDD, or a range YYYYMMDD-YYYYMMDD (either end may be left open)")
    start, dash, end = match.groups()
    try:
        first = datetime.strptime(start, "%Y%m%d").date() if start else None
        last = datetime.strptime(end, "%Y%m%d").date() if end else None
    except ValueError:
        raise InvalidInput("date: not a calendar date (YYYYMMDD)") from None
    if not dash:
        return first, first
    if first and last and first > last:
        raise InvalidInput("date: the range ends before it starts")
    return first, last


def check_uid(text: str, what: str = "Study Instance UID") -> str:
    uid = text.strip()
    if not uid or len(uid) > 64 or not _UID.match(uid):
        raise InvalidInput(f"{what}: digits and dots, at most 64 characters (as `medvqa pacs find` lists it)")
    return uid


def _identifier(what: str, value: str | None) -> str | None:
    value = (value or "").strip()
    if not value:
        return None
    if len(value) > 64 or "\\" in value or not value.isprintable():
        raise InvalidInput(f"{what}: at most 64 printable characters, no backslash")
    return value
