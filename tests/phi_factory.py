"""Synthetic DICOM files full of fake PHI, in top-level tags, nested sequences and private tags."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, UltrasoundImageStorage

# Every string here is fake PHI: none may survive import anywhere (stored files, database, logs).
PHI = {
    "PatientName": "Phisurname^Phigiven",
    "PatientID": "PHIID8812734",
    "OtherPatientIDs": "PHIOTHERID9910",
    "PatientBirthDate": "19570412",
    "PatientAddress": "12 Phistreet Phitown",
    "InstitutionName": "Phi General Hospital",
    "InstitutionAddress": "1 Phiroad Phicity",
    "ReferringPhysicianName": "Phireferrer^Doc",
    "PerformingPhysicianName": "Phiperformer^Doc",
    "OperatorsName": "Phioperator^Tech",
    "AccessionNumber": "PHIACC77123",
    "StudyID": "PHISTUDY4411",
    "StudyDescription": "Phidescription study",
    "SeriesDescription": "Phidescription series",
    "StationName": "PHISTATION9",
    "DeviceSerialNumber": "PHISERIAL5521",
    "StudyDate": "20190305",
    "SeriesDate": "20190305",
    "AcquisitionDate": "20190305",
    "ContentDate": "20190305",
}
NESTED_PHI = "Phinestedname^Deep"
PRIVATE_PHI = "PHIPRIVATEVALUE"
ORIGINAL_UIDS = {
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.11111111111111111111",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.22222222222222222222",
    "FrameOfReferenceUID": "1.2.826.0.1.3680043.8.498.33333333333333333333",
}


def phi_strings() -> list[str]:
    """Everything that must not be found after import (dates as written in the file)."""
    return [*PHI.values(), NESTED_PHI, PRIVATE_PHI, *ORIGINAL_UIDS.values(), "Phisurname", "Phidescription"]


def sop_uid(index: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.4444444444444444{index:04d}"


def make_phi_slice(index: int = 0, modality: str = "CT", rows: int = 16, columns: int = 16) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop_class = UltrasoundImageStorage if modality == "US" else CTImageStorage
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid(index)
    ds.file_meta.SourceApplicationEntityTitle = "PHISTATION9"
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, sop_uid(index), modality
    for keyword, value in {**PHI, **ORIGINAL_UIDS}.items():
        setattr(ds, keyword, value)
    ds.StudyTime = ds.SeriesTime = "101112"
    ds.BodyPartExamined = "CHEST"
    ds.InstanceNumber, ds.SeriesNumber = index + 1, 3
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, float(index) * 2.5]
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 2.5
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    _add_nested_phi(ds, index)
    _add_private_phi(ds)
    pixels = (np.arange(rows * columns, dtype=np.uint16).reshape(rows, columns) + index * 7) % 4096
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    return ds


def _add_nested_phi(ds: Dataset, index: int) -> None:
    """PHI three levels down, and references that must stay consistent after UIDs are replaced."""
    innermost = Dataset()
    innermost.PatientName = NESTED_PHI
    innermost.ReferencedSOPInstanceUID = sop_uid(index)
    middle = Dataset()
    middle.ReferencedImageSequence = Sequence([innermost])
    middle.RequestedProcedureDescription = NESTED_PHI
    request = Dataset()
    request.RequestAttributesSequence = Sequence([middle])
    request.ScheduledProcedureStepID = "PHIACC77123"
    ds.RequestAttributesSequence = Sequence([request])
    reference = Dataset()
    reference.ReferencedSOPClassUID = CTImageStorage
    reference.ReferencedSOPInstanceUID = sop_uid(index)
    ds.SourceImageSequence = Sequence([reference])
    other = Dataset()
    other.PatientID = PHI["OtherPatientIDs"]
    ds.OtherPatientIDsSequence = Sequence([other])


def _add_private_phi(ds: Dataset) -> None:
    block = ds.private_block(0x0009, "PHI VENDOR", create=True)
    block.add_new(0x01, "LO", PRIVATE_PHI)
    item = Dataset()
    item.PatientName = NESTED_PHI
    item.private_block(0x0011, "PHI VENDOR", create=True).add_new(0x02, "LO", PRIVATE_PHI)
    block.add_new(0x02, "SQ", Sequence([item]))


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def write_phi_series(folder: Path, count: int = 3, modality: str = "CT", first_index: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(first_index, first_index + count):
        path = folder / f"slice{index}.dcm"
        path.write_bytes(encode(make_phi_slice(index, modality)))
        paths.append(path)
    return paths
