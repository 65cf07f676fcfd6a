"""One source file -> a de-identified instance, stored content-addressed, described by an InstanceRecord.

Order matters: read and check, refuse what is not a renderable image (by SOP class), decode the pixels (a
corrupt stream is refused before anything is stored), look for burned-in text, de-identify (allowlist), clean the
pixel data stream, then store. The original identifiers never leave this function.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from compliance.deid import Deidentifier, DeidError, DeidReport
from medvqa.errors import ImportRefused, ImportSkipped
from medvqa.imaging.burned_in import TextDetection, TextDetector
from medvqa.imaging.pixel_data import clean_pixel_data
from medvqa.imaging.reader import (
    ImportLimits,
    capture_decoded,
    check_image_size,
    decode_pixels,
    read_dicom,
    scrub_message,
)
from medvqa.imaging.render_check import check_renders
from medvqa.imaging.secondary_capture import dataset_from_image, is_plain_image
from medvqa.imaging.sop_classes import check_renderable_sop_class
from medvqa.imaging.store import ContentStore

SECONDARY_CAPTURE_CLASSES = {f"1.2.840.10008.5.1.4.1.1.7{suffix}" for suffix in ("", ".1", ".2", ".3", ".4")}
BURNED_IN_MODALITIES = {"US", "SC"}
ULTRASOUND_CLASSES = {f"1.2.840.10008.5.1.4.1.1.{suffix}" for suffix in ("3", "3.1", "6", "6.1")}


@dataclass(frozen=True)
class InstanceRecord:
    """What the database keeps about one stored instance (pseudonymised UIDs only)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    patient_pseudonym: str
    modality: str
    body_part: str
    study_date: date | None
    series_number: int | None
    instance_number: int | None
    slice_position: float | None
    rows: int
    columns: int
    frames: int
    pixel_hash: str
    storage_path: str
    held_for_burned_in_text: bool
    spacing: dict[str, Any] = field(default_factory=dict)
    window: dict[str, Any] = field(default_factory=dict)
    colour: bool = False  # frames are RGB: a series must not mix colour and grey (set by the render check)
    burned_in_text: dict[str, Any] = field(default_factory=dict)  # the detector's boxes (never the text), or {}
    deid_report: dict[str, Any] = field(default_factory=dict)  # values corrected (by keyword), elements dropped

    @property
    def values_corrected(self) -> int:
        return int(sum(self.deid_report.get("corrected", {}).values()))


def ocr_cache_dir(store: ContentStore) -> Path:
    """OCR results by pixel hash live beside the store (MEDVQA_HOME/ocr-cache): boxes and confidences only."""
    return store.root.parent / "ocr-cache"


def prepare_instance(
    data: bytes,
    deid: Deidentifier,
    store: ContentStore,
    limits: ImportLimits,
    detector: TextDetector | None = None,
) -> InstanceRecord:
    """Check, decode, de-identify and store one file; raise ImportRefused (nothing stored) when it is bad."""
    check_image_size(data, limits)  # a PNG/JPEG decompression bomb is refused from its header
    detector = detector or TextDetector(ocr_cache_dir(store))
    with capture_decoded() as decoded:  # the pixels are decoded once: the render check reuses them
        record, encoded = _deidentified(data, deid, limits, detector)
    colour = check_renders(encoded, decoded)  # what the viewer and the model could not open is refused, not stored
    return replace(record, colour=colour, storage_path=store.put(encoded))  # disk errors stay errors


def _deidentified(
    data: bytes, deid: Deidentifier, limits: ImportLimits, detector: TextDetector
) -> tuple[InstanceRecord, bytes]:
    """The boundary around everything that interprets the file's bytes. pydicom converts values lazily, so a
    corrupt header can raise from anywhere below; whatever it raises becomes one refusal line for this file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warnings can quote element values
        try:
            ds = dataset_from_image(data, limits.max_pixels) if is_plain_image(data) else read_dicom(data, limits)
            check_renderable_sop_class(ds)
            pixels = decode_pixels(ds)
            pixel_hash = hash_pixels(pixels)
            detection, held = burned_in_check(ds, pixels, pixel_hash, detector)
            report = deid.deidentify_with_report(ds)
            clean_pixel_data(ds, pixels)
            if detection is not None and detection.found_text:
                ds.BurnedInAnnotation = "YES"  # the detector saw text, whatever the file claimed
            return _record(ds, pixel_hash, "", held, detection, report), _encode(ds)
        except (ImportRefused, ImportSkipped):
            raise
        except DeidError as exc:
            raise ImportRefused(str(exc)) from None
        except (LookupError, UnicodeError):
            raise ImportRefused("text in an unknown or invalid character set") from None
        except Exception as exc:
            raise ImportRefused(f"unreadable DICOM data ({type(exc).__name__}): {scrub_message(exc)}") from None


def hash_pixels(pixels: np.ndarray) -> str:
    """SHA-256 of the decoded pixel values with their shape and type: equal for the same image whatever
    the transfer syntax it was stored in."""
    header = f"{pixels.dtype.str}{pixels.shape}".encode()
    return hashlib.sha256(header + np.ascontiguousarray(pixels).tobytes()).hexdigest()


def _flag(ds: Dataset) -> str:
    return str(ds.get("BurnedInAnnotation", "") or "").strip().upper()


def is_capture_or_ultrasound(ds: Dataset) -> bool:
    """Secondary captures and ultrasound: the kinds of image that carry burned-in text most often."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return (
        str(ds.get("Modality", "")) in BURNED_IN_MODALITIES
        or str(ds.get("SOPClassUID", "")) in SECONDARY_CAPTURE_CLASSES | ULTRASOUND_CLASSES
        or "SECONDARY" in image_type
    )


def may_carry_burned_in_text(ds: Dataset) -> bool:
    """BurnedInAnnotation YES, or unknown on ultrasound and secondary captures: a person must look first
    (whatever the OCR finds)."""
    flag = _flag(ds)
    if flag in ("YES", "NO"):
        return flag == "YES"
    return is_capture_or_ultrasound(ds)


def needs_text_detection(ds: Dataset) -> bool:
    """OCR runs on every secondary capture and ultrasound image, and on anything not declared free of text."""
    return _flag(ds) != "NO" or is_capture_or_ultrasound(ds)


def burned_in_check(
    ds: Dataset, pixels: np.ndarray, pixel_hash: str, detector: TextDetector
) -> tuple[TextDetection | None, bool]:
    """(what the detector found, or None when it did not run; whether the instance is held for a reviewer).
    Held when the file says YES, when ultrasound or a secondary capture does not say, when the detector finds
    text, or when it was needed and could not run."""
    held = may_carry_burned_in_text(ds)
    if not needs_text_detection(ds):
        return None, held
    detection = detector.detect(pixels, int(ds.get("SamplesPerPixel") or 1), pixel_hash)
    return detection, held or detection.found_text or not detection.checked


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _record(
    ds: Dataset,
    pixel_hash: str,
    storage_path: str,
    held: bool,
    detection: TextDetection | None = None,
    report: DeidReport | None = None,
) -> InstanceRecord:
    return InstanceRecord(
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        patient_pseudonym=str(ds.PatientID),
        modality=str(ds.get("Modality", "") or "OT")[:16],
        body_part=str(ds.get("BodyPartExamined", "") or "")[:64],
        study_date=_date(ds.get("StudyDate")),
        series_number=_int(ds.get("SeriesNumber")),
        instance_number=_int(ds.get("InstanceNumber")),
        slice_position=_slice_position(ds),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        frames=int(ds.get("NumberOfFrames") or 1),
        pixel_hash=pixel_hash,
        storage_path=storage_path,
        held_for_burned_in_text=held,
        spacing=_spacing(ds),
        window=_window(ds),
        burned_in_text=detection.as_dict() if detection is not None else {},
        deid_report=report.as_dict() if report is not None else {},
    )


def _int(value: Any) -> int | None:
    """An integer that fits the database's INTEGER column, else None (junk or absurd values are not kept)."""
    try:
        number = int(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None
    return number if number is None or -(2**31) <= number < 2**31 else None


def _date(value: Any) -> date | None:
    try:
        return datetime.strptime(str(value), "%Y%m%d").date() if value else None
    except ValueError:
        return None


def _slice_position(ds: Dataset) -> float | None:
    try:
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        position = np.array([float(v) for v in ds.ImagePositionPatient])
    except (AttributeError, TypeError, ValueError):
        return None
    if orientation.shape != (6,) or position.shape != (3,):
        return None
    along = float(np.dot(position, np.cross(orientation[:3], orientation[3:])))
    return along if math.isfinite(along) else None


def _first_floats(value: Any) -> list[float]:
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError, OverflowError):
        return []
    return numbers if all(math.isfinite(n) for n in numbers) else []  # NaN/infinity are not JSON


def _spacing(ds: Dataset) -> dict[str, Any]:
    pixel = _first_floats(ds.get("PixelSpacing") or [])
    thickness = _first_floats(ds.get("SliceThickness") or [])
    spacing: dict[str, Any] = {}
    if len(pixel) == 2:
        spacing["row"], spacing["column"] = pixel
    if thickness:
        spacing["thickness"] = thickness[0]
    return spacing


def _window(ds: Dataset) -> dict[str, Any]:
    centers = _first_floats(ds.get("WindowCenter") or [])
    widths = _first_floats(ds.get("WindowWidth") or [])
    return {"center": centers[0], "width": widths[0]} if centers and widths else {}
