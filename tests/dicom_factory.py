"""Synthetic but valid DICOM images for tests: a CT/MR/SC slice with file meta, built with pydicom.

`make_slice()` gives a 4x4 CT slice of one shared test study and series; keyword arguments change the pixels,
geometry, rescale, window or photometric interpretation, and any other DICOM keyword (None deletes it).
The patient fields hold obviously fake identifying data, so de-identification tests can check they go.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

STUDY_UID = generate_uid()
SERIES_UID = generate_uid()
FRAME_OF_REFERENCE_UID = generate_uid()
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "OT": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
}
FAKE_PATIENT = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-0001",
    "PatientBirthDate": "19700101",
    "PatientSex": "F",
    "AccessionNumber": "ACC-0001",
    "InstitutionName": "Test General Hospital",
    "ReferringPhysicianName": "Smith^John",
    "StudyDate": "20240102",
    "StudyTime": "101500",
    "StudyID": "1",
}


def make_slice(
    *,
    pixels: np.ndarray | None = None,
    position: Sequence[float] | None = (0.0, 0.0, 0.0),
    orientation: Sequence[float] | None = AXIAL,
    instance_number: int | None = 1,
    rescale: tuple[float, float] | None = (1.0, 0.0),
    window: tuple[float, float] | None = None,
    photometric: str | None = None,
    bits_stored: int | None = None,
    modality: str = "CT",
    series_uid: str = SERIES_UID,
    pixel_spacing: tuple[float, float] | None = (0.5, 0.5),
    slice_thickness: float | None = None,
    **attributes: Any,
) -> pydicom.Dataset:
    """A single-frame image Dataset with file meta (Explicit VR Little Endian); `attributes` set any keyword.

    pixels: [H, W] grey (uint8/uint16/int16) or [H, W, 3] colour (uint8); [F, H, W(, 3)] makes a multi-frame.
    rescale: (slope, intercept); window: (center, width); photometric defaults to MONOCHROME2 or RGB.
    """
    array = np.arange(16, dtype=np.uint16).reshape(4, 4) if pixels is None else np.asarray(pixels)
    detected = array.ndim in (3, 4) and array.shape[-1] == 3 and array.dtype == np.uint8
    colour = detected if photometric is None else not photometric.startswith("MONOCHROME")
    dataset = pydicom.Dataset()
    dataset.file_meta = _file_meta(SOP_CLASSES.get(modality, SOP_CLASSES["OT"]))
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.update({"Modality": modality, "StudyInstanceUID": STUDY_UID, "SeriesInstanceUID": series_uid})
    dataset.FrameOfReferenceUID = FRAME_OF_REFERENCE_UID
    dataset.SeriesNumber = 1
    for keyword, value in FAKE_PATIENT.items():
        setattr(dataset, keyword, value)
    dataset.set_pixel_data(
        array,
        photometric or ("RGB" if colour else "MONOCHROME2"),
        bits_stored or array.dtype.itemsize * 8,
        generate_instance_uid=False,
    )
    optional = {
        "InstanceNumber": instance_number,
        "ImagePositionPatient": None if position is None else [float(value) for value in position],
        "ImageOrientationPatient": None if orientation is None else [float(value) for value in orientation],
        "PixelSpacing": None if pixel_spacing is None else list(pixel_spacing),
        "SliceThickness": slice_thickness,
        "RescaleSlope": None if rescale is None or colour else rescale[0],
        "RescaleIntercept": None if rescale is None or colour else rescale[1],
        "WindowCenter": None if window is None else window[0],
        "WindowWidth": None if window is None else window[1],
    }
    _apply(dataset, {**optional, **attributes})
    return dataset


def write_slice(path: Path, **overrides: Any) -> Path:
    """Write `make_slice(**overrides)` as a DICOM Part 10 file at `path` and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    make_slice(**overrides).save_as(path, enforce_file_format=True)
    return path


def per_frame_positions(positions: Sequence[Sequence[float]]) -> DicomSequence:
    """A PerFrameFunctionalGroupsSequence giving each frame of an enhanced image its PlanePositionSequence."""
    items = []
    for position in positions:
        plane = pydicom.Dataset()
        plane.ImagePositionPatient = [float(value) for value in position]
        group = pydicom.Dataset()
        group.PlanePositionSequence = DicomSequence([plane])
        items.append(group)
    return DicomSequence(items)


def _file_meta(sop_class_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _apply(dataset: pydicom.Dataset, attributes: dict[str, Any]) -> None:
    for keyword, value in attributes.items():
        if value is None:
            if keyword in dataset:
                delattr(dataset, keyword)
        else:
            setattr(dataset, keyword, value)
