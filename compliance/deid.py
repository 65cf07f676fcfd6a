"""De-identification: an allowlist of what the product needs, over DICOM PS3.15 Annex E as a floor.

What is kept: exactly the attributes medvqa reads (SOP identity, the pixel, image plane and pixel-value modules,
modality and body part, windowing and VOI LUTs, modality LUT and rescale, palette colour LUTs, frame of reference,
the functional groups `medvqa/imaging/frames.py` reads, the tags the viewer's metadata panel shows), at the
depths where it reads them (`ALLOWED`). Everything else goes, at every depth: private tags, unknown public tags,
free text of any VR, overlays (60xx), curves (50xx), icon images, embedded documents, sequences not listed.

Every kept value is validated against its VR and the product's needs: a number that is not a number (or has the
wrong multiplicity), a code that is not one of the standard's defined terms, a UID that is not a UID, a date that
is not a Gregorian date. Such a value is replaced (a safe value where the attribute is Type 1 and needed, e.g.
Modality -> OT), emptied (Type 2) or removed, and counted by attribute keyword in the `DeidReport`; the bad value
itself is never kept, logged or reported.

Table E.1-1 (2026c edition, as shipped by the maintained `dicom-anonymizer` package) stays the floor: whatever
it says to remove, empty or replace is removed, emptied or replaced even when the allowlist keeps the attribute
(UIDs become `2.25.<HMAC-SHA-256>` with the site key; dates are shifted instead under the "Retain Longitudinal
Temporal Information with Modified Dates" option, a switch). The preamble is zeroed and the file meta rebuilt
with our implementation UID and version only. compliance/deidentification.md says which PS3.15 options hold.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import os
import re
import secrets
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID

from compliance.dicom_terms import BODY_PARTS, MODALITIES, PHOTOMETRIC_INTERPRETATIONS
from medvqa.errors import MedVQAError

PROFILE_EDITION = "dicomfields_2026c"
METHOD = "medvqa allowlist over PS3.15 E.1-1 (2026c edition), keyed UIDs"
# CID 7050 "De-identification Method": the profile and the options the result satisfies (deidentification.md).
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
CLEAN_PIXEL_DATA_CODE = ("113101", "DCM", "Clean Pixel Data Option")
CLEAN_GRAPHICS_CODE = ("113103", "DCM", "Clean Graphics Option")
CLEAN_STRUCTURED_CONTENT_CODE = ("113104", "DCM", "Clean Structured Content Option")
CLEAN_DESCRIPTORS_CODE = ("113105", "DCM", "Clean Descriptors Option")
RETAIN_DATES_CODE = ("113107", "DCM", "Retain Longitudinal Temporal Information Modified Dates Option")
ALWAYS_CODES = (BASIC_PROFILE_CODE, CLEAN_GRAPHICS_CODE, CLEAN_STRUCTURED_CONTENT_CODE, CLEAN_DESCRIPTORS_CODE)
# Our file meta: a UID under 2.25 (a UUID made once for medvqa) and a version name of at most 16 characters.
IMPLEMENTATION_CLASS_UID = "2.25.238946592107356011398532547003617651839"
IMPLEMENTATION_VERSION_NAME = "MEDVQA_1"
ZERO_PREAMBLE = b"\x00" * 128
MAX_SEQUENCE_DEPTH = 16
DUMMY_TEXT = "ANONYMIZED"
DUMMY_BY_VR: dict[str, Any] = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "IS": "0", "DS": "0"}
TEXT_VRS = {"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
MAX_LENGTH = {"AE": 16, "AS": 4, "CS": 16, "LO": 64, "PN": 64, "SH": 16}
BINARY_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "AT", "OB", "OW", "OD", "OF", "OL", "OV", "SV", "UV"}

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
LENIENT_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # leading zeros: a vendor quirk the reader lets in
CS_PATTERN = re.compile(r"^[A-Z0-9_ ]{0,16}$")
IS_PATTERN = re.compile(r"^[+-]?[0-9]{1,12}$")
DS_PATTERN = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$")
DA_PATTERN = re.compile(r"^[0-9]{8}$")


class DeidError(MedVQAError):
    """The dataset cannot be de-identified safely (the message names no identifier)."""


@dataclass(frozen=True, eq=False)  # hashed by identity: rules are module constants
class Rule:
    """What an allowlisted attribute may hold. `vm` is (fewest, most) values; `invalid` says what replaces a
    bad value: "remove", "empty" (Type 2), "refuse" (the image cannot be used without it) or a safe value."""

    vm: tuple[int, int] = (1, 1)
    terms: frozenset[str] | None = None
    positive: bool = False
    invalid: str = "remove"
    remap_uid: bool = False
    longitudinal: bool = False  # a date kept only under the Retain Longitudinal (Modified Dates) option
    keep_first: int = 0  # keep only the first N values (ImageType: values 3+ are free-form codes)
    items: Mapping[str, Rule] | None = None  # a sequence: the allowlist of its items


MANY = 1 << 16
YES_NO = frozenset({"YES", "NO"})
RESCALE_TYPES = frozenset({"OD", "HU", "US", "MGML", "Z_EFF", "ED", "EDW", "HU_MOD", "PCT"})
IMAGE_TYPE_VALUES = frozenset({"ORIGINAL", "DERIVED", "PRIMARY", "SECONDARY"})
_date = Rule(invalid="remove", longitudinal=True)
_number = Rule()
_positive = Rule(positive=True)
_lut = {"LUTDescriptor": Rule(vm=(3, 3)), "LUTData": Rule(vm=(1, MANY))}
_rescale = {"RescaleSlope": _number, "RescaleIntercept": _number, "RescaleType": Rule(terms=RESCALE_TYPES)}
_voi = {
    "WindowCenter": Rule(vm=(1, MANY)),
    "WindowWidth": Rule(vm=(1, MANY), positive=True),
    "VOILUTFunction": Rule(terms=frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})),
}
_measures = {
    "PixelSpacing": Rule(vm=(2, 2), positive=True),
    "SliceThickness": _positive,
    "SpacingBetweenSlices": _number,
}
_reference = {"ReferencedSOPClassUID": Rule(), "ReferencedSOPInstanceUID": Rule(remap_uid=True)}
_functional_group = {  # the functional-group macros medvqa/imaging/frames.py and series.py read
    "PlanePositionSequence": Rule(vm=(0, MANY), items={"ImagePositionPatient": Rule(vm=(3, 3))}),
    "PlaneOrientationSequence": Rule(vm=(0, MANY), items={"ImageOrientationPatient": Rule(vm=(6, 6))}),
    "PixelMeasuresSequence": Rule(vm=(0, MANY), items=_measures),
    "PixelValueTransformationSequence": Rule(vm=(0, MANY), items=_rescale),
    "FrameVOILUTSequence": Rule(vm=(0, MANY), items=_voi),
}
ALLOWED: dict[str, Rule] = {
    # SOP common and identity (UIDs remapped with the site key); the pseudonym and de-identification
    # attributes are written afterwards, never copied from the input.
    "SOPClassUID": Rule(invalid="refuse"),
    "SOPInstanceUID": Rule(invalid="refuse", remap_uid=True),
    "StudyInstanceUID": Rule(invalid="refuse", remap_uid=True),
    "SeriesInstanceUID": Rule(invalid="refuse", remap_uid=True),
    "FrameOfReferenceUID": Rule(remap_uid=True),
    "StudyDate": Rule(invalid="empty"),  # Table E.1-1: Z, or shifted under the dates option
    "SeriesDate": _date,
    "AcquisitionDate": _date,
    "ContentDate": _date,
    "PatientBirthDate": _date,
    # What the product shows and files studies by
    "Modality": Rule(terms=MODALITIES, invalid="OT"),
    "BodyPartExamined": Rule(terms=BODY_PARTS),
    "SeriesNumber": _number,
    "InstanceNumber": _number,
    "ImageType": Rule(vm=(2, MANY), terms=IMAGE_TYPE_VALUES, keep_first=2),
    "BurnedInAnnotation": Rule(terms=YES_NO),
    "RecognizableVisualFeatures": Rule(terms=YES_NO),
    "ConversionType": Rule(terms=frozenset({"DV", "DI", "DF", "WSD", "SD", "SI", "DRW", "SYN"})),
    "LossyImageCompression": Rule(terms=frozenset({"00", "01"})),
    "LossyImageCompressionRatio": Rule(vm=(1, MANY), positive=True),
    "LossyImageCompressionMethod": Rule(
        vm=(1, MANY),
        terms=frozenset(
            {"ISO_10918_1", "ISO_14495_1", "ISO_15444_1", "ISO_15444_15", "ISO_13818_2", "ISO_14496_10"}
            | {"ISO_23008_2", "ISO_18181_1"}
        ),
    ),
    # Image pixel module
    "Rows": Rule(invalid="refuse"),
    "Columns": Rule(invalid="refuse"),
    "SamplesPerPixel": Rule(invalid="refuse"),
    "PhotometricInterpretation": Rule(terms=PHOTOMETRIC_INTERPRETATIONS, invalid="refuse"),
    "PlanarConfiguration": Rule(invalid="refuse"),
    "BitsAllocated": Rule(invalid="refuse"),
    "BitsStored": Rule(invalid="refuse"),
    "HighBit": Rule(invalid="refuse"),
    "PixelRepresentation": Rule(invalid="refuse"),
    "PixelAspectRatio": Rule(vm=(2, 2), positive=True),
    "SmallestImagePixelValue": _number,
    "LargestImagePixelValue": _number,
    "PixelPaddingValue": _number,
    "PixelPaddingRangeLimit": _number,
    "NumberOfFrames": Rule(positive=True, invalid="refuse"),
    "FrameIncrementPointer": Rule(vm=(1, MANY)),
    "PixelData": Rule(invalid="refuse"),
    **{
        f"{colour}PaletteColorLookupTable{part}": Rule(vm=(3, 3) if part == "Descriptor" else (1, MANY))
        for colour in ("Red", "Green", "Blue")
        for part in ("Descriptor", "Data")
    },
    **{f"Segmented{colour}PaletteColorLookupTableData": Rule(vm=(1, MANY)) for colour in ("Red", "Green", "Blue")},
    # Image plane
    "PixelSpacing": Rule(vm=(2, 2), positive=True),
    "ImageOrientationPatient": Rule(vm=(6, 6)),
    "ImagePositionPatient": Rule(vm=(3, 3)),
    "SliceThickness": _positive,
    "SpacingBetweenSlices": _number,
    "SliceLocation": _number,
    # Modality LUT / rescale, VOI LUT / windowing
    **_rescale,
    "ModalityLUTSequence": Rule(vm=(0, 1), items={**_lut, "ModalityLUTType": Rule(terms=RESCALE_TYPES)}),
    **_voi,
    "VOILUTSequence": Rule(vm=(0, MANY), items=_lut),
    # Enhanced multi-frame functional groups
    "SharedFunctionalGroupsSequence": Rule(vm=(0, 1), items=_functional_group),
    # References to the images this one derives from: UIDs only, remapped like the instances they name
    "SourceImageSequence": Rule(vm=(0, MANY), items=_reference),
    "ReferencedImageSequence": Rule(vm=(0, MANY), items=_reference),
    "PerFrameFunctionalGroupsSequence": Rule(vm=(0, MANY), items=_functional_group),
}


# Table E.1-1 categories -> our action: D (dummy) wherever it is allowed, so Type 1 attributes stay present;
# X/Z empties (keeps Type 2 present); X/Z/U* on reference sequences keeps them and remaps the UIDs inside.
_CATEGORY_ACTION = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "D",
    "X_Z_TAGS": "Z",
    "X_D_TAGS": "D",
    "X_Z_D_TAGS": "D",
    "X_Z_U_STAR_TAGS": "U",
}


@cache
def _profile() -> tuple[dict[int, str], tuple[tuple[int, int, int, int, str], ...]]:
    """Exact tags -> action, plus (group, element, group mask, element mask, action) for repeating groups."""
    import importlib

    table = importlib.import_module(f"dicomanonymizer.dicom_anonymization_databases.{PROFILE_EDITION}")
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in _CATEGORY_ACTION.items():
        for entry in getattr(table, category):
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = action
            else:
                masked.append((*entry, action))
    return exact, tuple(masked)


def action_for(tag: BaseTag) -> str | None:
    """Table E.1-1's action for `tag`: X remove, Z empty, D dummy, U remap UID; None when not listed."""
    exact, masked = _profile()
    if int(tag) in exact:
        return exact[int(tag)]
    for group, element, group_mask, element_mask, action in masked:
        if tag.group & group_mask == group and tag.element & element_mask == element:
            return action
    return None


@cache
def _by_tag(rules: tuple[tuple[str, Rule], ...]) -> dict[int, tuple[str, Rule]]:
    resolved = {}
    for keyword, rule in rules:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise KeyError(f"{keyword} is not a DICOM keyword")
        resolved[tag] = (keyword, rule)
    return resolved


def allowed_tags(rules: Mapping[str, Rule]) -> dict[int, tuple[str, Rule]]:
    return _by_tag(tuple(rules.items()))


@dataclass(frozen=True)
class DeidSettings:
    key: bytes
    retain_longitudinal_dates: bool = False


@dataclass
class DeidReport:
    """What de-identification did to one instance: values replaced or removed because they were not valid for
    their VR (by attribute keyword, never the value), and how many elements the allowlist dropped."""

    corrected: Counter[str] = field(default_factory=Counter)
    removed_elements: int = 0

    @property
    def corrected_total(self) -> int:
        return sum(self.corrected.values())

    def as_dict(self) -> dict[str, Any]:
        return {"corrected": dict(sorted(self.corrected.items())), "removed_elements": self.removed_elements}


def load_site_key(path: Path) -> bytes:
    """The site's secret for keyed UIDs and pseudonyms; created (0600) on first use. Losing it breaks the
    link between re-imports of the same study, so back it up with the database."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
    key = bytes.fromhex(path.read_text().strip())
    if len(key) < 16:
        raise DeidError(f"the de-identification key in {path} is shorter than 16 bytes")
    return key


def method_codes(retain_dates: bool, pixels_cleaned: bool = False) -> Sequence:
    """DeidentificationMethodCodeSequence (CID 7050) for the profile and the options this result satisfies."""
    codes = list(ALWAYS_CODES)
    if pixels_cleaned:
        codes.insert(1, CLEAN_PIXEL_DATA_CODE)
    if retain_dates:
        codes.append(RETAIN_DATES_CODE)
    return Sequence([_code(*code) for code in codes])


def fresh_file_meta(ds: Dataset, transfer_syntax: str) -> FileMetaDataset:
    """File meta information with the SOP identity, the transfer syntax and our implementation only."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


class Deidentifier:
    """Applies the allowlist and the profile to datasets, in place; one instance per site key and settings."""

    def __init__(self, settings: DeidSettings, allowed: Mapping[str, Rule] | None = None) -> None:
        self.settings = settings
        self.allowed = ALLOWED if allowed is None else allowed

    def _digest(self, purpose: str, value: str) -> bytes:
        return hmac.new(self.settings.key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """A valid UID (2.25 + 128-bit integer, at most 44 characters) derived from the original."""
        return f"2.25.{int.from_bytes(self._digest('uid', original.strip())[:16], 'big')}"

    def keyed(self, purpose: str, value: str) -> str:
        """A keyed identifier for a value that must not be stored in clear (a PACS's patient ID or accession
        number in the audit trail): the same value gives the same 32 hex digits under the same site key."""
        return self._digest(purpose, value.strip())[:16].hex()

    def pseudonym(self, ds: Dataset) -> str:
        """Stable per patient: keyed on PatientID and its issuer, else on the study."""
        patient_id = str(ds.get("PatientID", "") or "").strip()
        if patient_id:
            basis = f"{patient_id}^{ds.get('IssuerOfPatientID', '')}"
        else:
            basis = f"study:{ds.get('StudyInstanceUID', '')}"
        return "ANON-" + self._digest("patient", basis)[:8].hex().upper()

    def date_shift_days(self, pseudonym: str) -> int:
        return -(1 + int.from_bytes(self._digest("dateshift", pseudonym)[:4], "big") % 3650)

    def deidentify(self, ds: Dataset) -> Dataset:
        """Keep only what the allowlist names (validated), write the pseudonym and how it was done; in place."""
        self.deidentify_with_report(ds)
        return ds

    def deidentify_with_report(self, ds: Dataset) -> DeidReport:
        _check_depth(ds, 0)
        pseudonym = self.pseudonym(ds)
        shift = self.date_shift_days(pseudonym) if self.settings.retain_longitudinal_dates else None
        meta = getattr(ds, "file_meta", None)
        transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
        report = DeidReport()
        clean = self._filter(ds, self.allowed, shift, report)
        ds.clear()
        ds.update(clean)
        ds.PatientID = pseudonym
        ds.PatientName = pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = METHOD
        ds.DeidentificationMethodCodeSequence = method_codes(shift is not None)
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if shift is not None else "REMOVED"
        ds.preamble = ZERO_PREAMBLE
        if transfer_syntax and "SOPClassUID" in ds and "SOPInstanceUID" in ds:
            ds.file_meta = fresh_file_meta(ds, transfer_syntax)
        return report

    def _filter(self, ds: Dataset, rules: Mapping[str, Rule], shift: int | None, report: DeidReport) -> Dataset:
        """A new dataset holding the allowlisted elements of `ds`, validated, with Table E.1-1 applied on top.
        Walks tags, not elements: only what is kept gets decoded."""
        allowed = allowed_tags(rules)
        clean = Dataset()
        for tag in list(ds.keys()):
            entry = allowed.get(int(tag)) if not tag.is_private else None
            if entry is None:
                report.removed_elements += 1
                continue
            keyword, rule = entry
            if rule.longitudinal and shift is None:
                report.removed_elements += 1
                continue
            element = self._kept(ds, tag, keyword, rule, shift, report)
            if element is not None:
                clean.add(element)
        return clean

    def _kept(
        self, ds: Dataset, tag: BaseTag, keyword: str, rule: Rule, shift: int | None, report: DeidReport
    ) -> DataElement | None:
        vr = _vr(ds, tag)
        if rule.items is not None:
            if vr != "SQ":
                return self._invalid(tag, keyword, rule, vr, report)
            items = ds[tag].value or []
            if not rule.vm[0] <= len(items) <= rule.vm[1]:
                return self._invalid(tag, keyword, rule, vr, report)
            return DataElement(tag, "SQ", Sequence([self._filter(item, rule.items, shift, report) for item in items]))
        if vr == "SQ":
            return self._invalid(tag, keyword, rule, vr, report)
        value = _validated(ds, tag, vr, rule)
        if value is _INVALID:
            return self._invalid(tag, keyword, rule, vr, report)
        if vr in BINARY_VRS:  # pydicom's element: it keeps an ambiguous VR ("US or SS") for the writer to settle
            element = ds[tag]
            return self._floor(DataElement(tag, element.VR, element.value), rule, shift)
        return self._floor(DataElement(tag, vr, value), rule, shift)

    def _invalid(self, tag: BaseTag, keyword: str, rule: Rule, vr: str, report: DeidReport) -> DataElement | None:
        report.corrected[keyword] += 1
        if rule.invalid == "refuse":
            raise DeidError(f"{keyword} does not hold a valid value for its VR, and the image cannot be used without")
        if rule.invalid == "remove":
            return None
        if rule.invalid == "empty":
            return DataElement(tag, _dictionary_vr(tag), None)
        return DataElement(tag, _dictionary_vr(tag), rule.invalid)

    def _floor(self, element: DataElement, rule: Rule, shift: int | None) -> DataElement | None:
        """Table E.1-1 over a kept element: whatever the profile removes, empties or replaces stays so."""
        action = action_for(element.tag)
        if rule.remap_uid or action == "U":
            if element.VR != "UI":
                return None
            element.value = _map_values(element.value, self.uid)
            return element
        if action is None:
            return element
        if action == "X":
            return None
        if shift is not None and element.VR in ("DA", "DT"):
            element.value = _map_values(element.value, lambda v: _shift_date(v, shift, element.VR))
            return element
        if action == "Z" or element.value in (None, "", b""):
            element.value = b"" if element.VR in BINARY_VRS - {"US", "SS", "UL", "SL", "FL", "FD", "AT"} else None
            return element
        element.value = _dummy(element.VR)
        return element


_INVALID = object()


def _validated(ds: Dataset, tag: BaseTag, vr: str, rule: Rule) -> Any:
    """The element's value if it is valid for its VR and the rule, else _INVALID. Text VRs are read from the
    raw bytes, so a value pydicom could not even convert is judged (and dropped) rather than raised on."""
    if vr in BINARY_VRS:
        value = ds[tag].value
        if vr in ("OB", "OW", "OD", "OF", "OL", "OV") and rule.vm == (1, 1):
            return value if isinstance(value, bytes) and value else _INVALID
        values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
        if isinstance(value, bytes):
            return value if value else _INVALID
        if not rule.vm[0] <= len(values) <= rule.vm[1]:
            return _INVALID
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            return _INVALID
        return value
    texts = _text_values(ds, tag)
    if texts is None:
        return _INVALID
    if rule.keep_first:
        texts = texts[: rule.keep_first] if len(texts) >= rule.vm[0] else texts
    if not rule.vm[0] <= len(texts) <= rule.vm[1]:
        return _INVALID
    check = _CHECKS.get(vr)
    if check is None or not all(check(text, rule) for text in texts):
        return _INVALID
    if vr == "IS":
        numbers = [int(text) for text in texts]
        return numbers[0] if len(numbers) == 1 else numbers
    return texts[0] if len(texts) == 1 else texts


def _text_values(ds: Dataset, tag: BaseTag) -> list[str] | None:
    """The values of a text element as ASCII strings (None when not ASCII or holding control characters)."""
    value = ds.get_item(tag).value
    if value is None:
        return []
    if isinstance(value, bytes):
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    elif isinstance(value, str):
        text = value
    elif isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    text = text.rstrip("\x00 ")
    if not text.isascii() or any(ord(c) < 32 for c in text):
        return None
    return [part.strip() for part in text.split("\\")] if text else []


def _check_cs(text: str, rule: Rule) -> bool:
    return bool(CS_PATTERN.match(text)) and bool(text) and (rule.terms is None or text in rule.terms)


def _check_lo(text: str, rule: Rule) -> bool:  # LO attributes on the list are coded values: their terms only
    return rule.terms is not None and text in rule.terms


def _check_is(text: str, rule: Rule) -> bool:
    if not IS_PATTERN.match(text):
        return False
    number = int(text)
    return -(2**31) <= number < 2**31 and (number > 0 or not rule.positive)


def _check_ds(text: str, rule: Rule) -> bool:
    if len(text) > 16 or not DS_PATTERN.match(text):
        return False
    number = float(text)
    return math.isfinite(number) and (number > 0 or not rule.positive)


def _check_da(text: str, rule: Rule) -> bool:
    if not DA_PATTERN.match(text):
        return False
    try:
        dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return True


def _check_ui(text: str, rule: Rule) -> bool:
    return 0 < len(text) <= 64 and bool(LENIENT_UID_PATTERN.match(text))


_CHECKS: dict[str, Callable[[str, Rule], bool]] = {
    "CS": _check_cs,
    "LO": _check_lo,
    "IS": _check_is,
    "DS": _check_ds,
    "DA": _check_da,
    "UI": _check_ui,
}


def _check_depth(ds: Dataset, depth: int) -> None:
    """Refuse sequences nested deeper than the walk goes, whatever they hold (kept or not)."""
    if depth > MAX_SEQUENCE_DEPTH:
        raise DeidError(f"sequences are nested deeper than {MAX_SEQUENCE_DEPTH} levels")
    for tag in list(ds.keys()):
        if _vr(ds, tag) == "SQ":
            for item in ds[tag].value or []:
                _check_depth(item, depth + 1)


def _vr(ds: Dataset, tag: BaseTag) -> str:
    raw_vr = ds.get_item(tag).VR
    if raw_vr and raw_vr != "UN":
        return str(raw_vr).split(" or ")[0]
    return _dictionary_vr(tag)


def _dictionary_vr(tag: BaseTag) -> str:
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _map_values(value: Any, function: Callable[[str], str]) -> Any:
    if value is None or value == "":
        return value
    if isinstance(value, str):
        return function(value)
    return [function(str(v)) for v in value]


def _dummy(vr: str) -> Any:
    if vr in DUMMY_BY_VR:
        return DUMMY_BY_VR[vr]
    if vr in TEXT_VRS:
        return DUMMY_TEXT[: MAX_LENGTH.get(vr, 64)] if vr != "AS" else "000Y"
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT"):
        return 0
    return b""


def _shift_date(value: str, days: int, vr: str) -> str:
    """Shift the date part; anything unparseable is emptied, never kept."""
    text = value.strip()
    try:
        day = dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return ""
    shifted = (day + dt.timedelta(days=days)).strftime("%Y%m%d")
    return shifted + (text[8:] if vr == "DT" else "")
