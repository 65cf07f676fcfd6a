"""Synthetic DICOM files full of fake PHI, in top-level tags, nested sequences and private tags."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataelem import DataElement
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


# ---- Markers in every place a file can hide text (issue 15): preamble, file meta, every VR, every depth,
# overlays and curves, retained numbers and codes, alternative calendars, private and unknown tags. ----

TEXT_VR_VALUES = {  # VR -> a template for a marker value valid in shape for that VR ({n}: a distinct number)
    "AE": "MKAE{n:08d}",
    "AS": "{n3:03d}W",
    "CS": "MKCS{n:08d}",
    "DA": "1888{mm:02d}{dd:02d}",
    "DS": "MKDS{n:08d}",
    "DT": "1777{mm:02d}{dd:02d}235959",
    "IS": "MKIS{n:08d}",
    "LO": "Mklo marker {n:08d}",
    "LT": "Mklt marker {n:08d}",
    "PN": "Mkpn^Marker{n:08d}",
    "SH": "MKSH{n:08d}",
    "ST": "Mkst marker {n:08d}",
    "TM": "2359{ss:02d}.{n:06d}",
    "UC": "Mkuc marker {n:08d}",
    "UI": "1.2.999.{n:08d}.77123",
    "UR": "http://mkur.example/{n:08d}",
    "UT": "Mkut marker {n:08d}",
}
BYTE_VRS = ("OB", "OW", "UN")


class Markers:
    """Hands out distinct marker values and remembers them all."""

    def __init__(self, seed: int = 0) -> None:
        self.counter = seed * 10_000
        self.values: list[str] = []

    def text(self, vr: str) -> str:
        self.counter += 1
        n = self.counter
        value = TEXT_VR_VALUES[vr].format(n=n, n3=100 + n % 900, mm=1 + n % 12, dd=1 + n % 28, ss=n % 60)
        self.values.append(value)
        return value

    def raw(self) -> bytes:
        self.counter += 1
        value = f"MKBYTES{self.counter:08d}X"  # even length
        self.values.append(value)
        return value.encode()

    def add(self, holder: Dataset, tag: int, vr: str) -> None:
        """Plant a marker of `vr` at `tag` in `holder`."""
        if vr in BYTE_VRS:
            holder.add_new(tag, vr, self.raw())
        elif vr in ("DS", "IS"):
            holder[tag] = text_element(tag, vr, self.text(vr))
        else:
            holder.add_new(tag, vr, self.text(vr))


def text_element(tag: int, vr: str, value: str | list[str]) -> DataElement:
    """An element holding `value` as written, even where its VR promises a number (pydicom would refuse it)."""
    if vr not in ("DS", "IS"):
        return DataElement(tag, vr, value)
    element = DataElement(tag, vr, None)
    element._value = value
    return element


def _public_tag_for(vr: str, exclude: set[int]) -> int:
    from pydicom.datadict import DicomDictionary

    for tag, entry in sorted(DicomDictionary.items()):
        group = tag >> 16
        usable = group not in (0x0000, 0x0002, 0x0008, 0x7FE0, 0xFFFE) and (group & 0xFF00) not in (0x5000, 0x6000)
        if entry[0] == vr and entry[3] == "" and usable and tag not in exclude and tag & 0xFFFF:
            return int(tag)
    raise LookupError(vr)


def make_marked_file(seed: int = 0) -> tuple[bytes, list[str]]:
    """A valid CT instance with a distinct marker in every place text can hide; returns the file's bytes and
    every marker planted (none may survive import anywhere)."""
    from pydicom.datadict import tag_for_keyword

    from compliance.deid import ALLOWED

    marks = Markers(seed)
    ds = make_phi_slice(seed)
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.9{seed:04d}1"
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.9{seed:04d}2"
    allowed = {tag_for_keyword(k) for k in ALLOWED}
    # every VR that can hold text, plus byte VRs, at the top level and three levels down a sequence
    holder, depth_items = ds, []
    for depth in range(4):
        used: set[int] = set(allowed)
        for vr in (*TEXT_VR_VALUES, "OB", "OW"):
            tag = _public_tag_for(vr, used)
            used.add(tag)
            marks.add(holder, tag, vr)
        holder.add_new(0x00980010 + depth * 2, "UN", marks.raw())  # unknown public tag
        child = Dataset()
        holder.ReferencedStudySequence = Sequence([child])
        depth_items.append(holder)
        holder = child
    # named free-text places the external check used
    ds.TextValue, ds.DocumentTitle, ds.ImageComments = marks.text("UT"), marks.text("ST"), marks.text("LT")
    ds.add_new(0x00189916, "LO", marks.text("LO"))  # InstructionText
    ds.add_new(0x00140104, "PN", marks.text("PN"))  # SecondaryReviewerName (group 0014)
    ds.add_new(0x00142006, "PN", marks.text("PN"))  # EvaluatorName
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "MK1", "99MK", marks.text("LO")
    ds.AnatomicRegionSequence = Sequence([code])
    # overlays and curves
    ds.add_new(0x60000010, "US", 16)
    ds.add_new(0x60000011, "US", 16)
    ds.add_new(0x60003000, "OW", marks.raw())
    ds.add_new(0x60000022, "LO", marks.text("LO"))
    ds.add_new(0x60001500, "LO", marks.text("LO"))
    ds.add_new(0x50000022, "LO", marks.text("LO"))
    ds.add_new(0x50003000, "OB", marks.raw())
    # embedded documents, waveforms, icons
    ds.EncapsulatedDocument = marks.raw()
    icon = Dataset()
    icon.Rows, icon.Columns, icon.BitsAllocated, icon.SamplesPerPixel = 1, 16, 8, 1
    icon.PhotometricInterpretation, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = "MONOCHROME2", 8, 7, 0
    icon.PixelData = marks.raw()
    ds.IconImageSequence = Sequence([icon])
    # retained attributes whose VR promises a number or a code, holding text instead
    ds["InstanceNumber"] = text_element(0x00200013, "IS", marks.text("IS"))
    ds["SliceThickness"] = text_element(0x00180050, "DS", marks.text("DS"))
    ds["WindowCenter"] = text_element(0x00281050, "DS", marks.text("DS"))
    ds["PixelSpacing"] = text_element(0x00280030, "DS", [marks.text("DS"), marks.text("DS")])
    ds["Modality"] = text_element(0x00080060, "CS", marks.text("CS"))
    ds["BodyPartExamined"] = text_element(0x00180015, "CS", marks.text("CS"))
    ds["ImageType"] = text_element(0x00080008, "CS", ["ORIGINAL", "PRIMARY", marks.text("CS")])
    ds["RescaleType"] = text_element(0x00281054, "LO", marks.text("LO"))
    ds["FrameOfReferenceUID"] = text_element(0x00200052, "UI", marks.text("UI"))
    # dates in other calendars, and Gregorian-looking junk in a date that is kept
    ds.add_new(0x00100033, "LO", marks.text("LO"))  # PatientBirthDateInAlternativeCalendar
    ds.add_new(0x00100034, "LO", marks.text("LO"))  # PatientDeathDateInAlternativeCalendar
    ds.add_new(0x00100035, "CS", marks.text("CS"))  # PatientAlternativeCalendar
    # an allowlisted sequence with text where only numbers belong, and text where nothing is kept
    measures = Dataset()
    measures["PixelSpacing"] = text_element(0x00280030, "DS", [marks.text("DS"), "0.5"])
    measures.add_new(0x00209158, "LT", marks.text("LT"))  # FrameComments
    group = Dataset()
    group.PixelMeasuresSequence = Sequence([measures])
    group.add_new(0x00209158, "LT", marks.text("LT"))
    ds.SharedFunctionalGroupsSequence = Sequence([group])
    # private tags with every kind of content
    block = ds.private_block(0x0031, "MK VENDOR", create=True)
    block.add_new(0x01, "LO", marks.text("LO"))
    block.add_new(0x02, "OB", marks.raw())
    # file meta: every group 2 text element, and the preamble
    meta = ds.file_meta
    meta.SourceApplicationEntityTitle = marks.text("AE")
    meta.SendingApplicationEntityTitle = marks.text("AE")
    meta.ReceivingApplicationEntityTitle = marks.text("AE")
    meta.ImplementationVersionName = marks.text("SH")
    meta.ImplementationClassUID = marks.text("UI")
    meta.SourcePresentationAddress = marks.text("UR")
    meta.PrivateInformationCreatorUID = marks.text("UI")
    meta.PrivateInformation = marks.raw()
    preamble = f"MKPREAMBLE{seed:08d}".encode()
    marks.values.append(preamble.decode())
    ds.preamble = preamble.ljust(128, b"\x00")
    return encode(ds), marks.values
