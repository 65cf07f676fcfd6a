"""Reading one file into a checked pydicom Dataset. Every refusal is one line that says why, names no
patient identifier, and comes before memory is spent on what the file merely declares."""

from __future__ import annotations

import io
import logging
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from pydicom import config, dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, MediaStorageDirectoryStorage

from medvqa.errors import ImportRefused, ImportSkipped

# pydicom's value-validation warnings quote element values (possibly identifiers) into logs; the checks that
# matter for import are made here, so those warnings are turned off for the process, and pydicom's own log
# (structure notes such as "expected explicit VR") is kept to errors.
config.settings.reading_validation_mode = config.IGNORE
logging.getLogger("pydicom").setLevel(logging.ERROR)

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
LENIENT_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # leading zeros: a common vendor quirk, harmless
UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA_TAG = 0x7FE00010
IDENTITY_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class ImportLimits:
    max_file_bytes: int = 1 << 30
    max_pixels: int = 300_000_000
    max_instances: int = 20_000


def read_dicom(data: bytes, limits: ImportLimits) -> Dataset:
    """A parsed Part 10 file whose identity and pixel data were checked (pixels not decoded yet)."""
    if not data:
        raise ImportRefused("empty file")
    if len(data) > limits.max_file_bytes:
        raise ImportRefused(
            f"{len(data)} bytes exceed the limit of {limits.max_file_bytes} (MEDVQA_IMPORT_MAX_FILE_BYTES)"
        )
    if len(data) < 132 or data[128:132] != b"DICM":
        raise ImportRefused("not a DICOM file: no 'DICM' marker after the 128-byte preamble")
    transfer_syntax = _transfer_syntax(data)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        _check_inflated_size(data, limits.max_file_bytes)
    ds = _parse(data)
    if ds.file_meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
        raise ImportSkipped("DICOMDIR index: the files it lists are imported instead")
    _check_declared_lengths(ds)
    if any(tag.group == 0 for tag in list(ds.keys())):  # iterating a Dataset gives elements, not tags
        raise ImportRefused("command-set elements (0000,xxxx) do not belong in a stored instance")
    _check_identity(ds)
    _check_pixel_data(ds, transfer_syntax, limits)
    return ds


def _transfer_syntax(data: bytes) -> UID:
    buffer = io.BytesIO(data)
    buffer.seek(132)
    try:
        meta = _read_file_meta_info(buffer)  # the group-2 reader dcmread uses, on bytes already in memory
    except (InvalidDicomError, EOFError, ValueError, KeyError, struct.error) as exc:
        raise ImportRefused(f"the file meta information is unreadable: {scrub_message(exc)}") from None
    transfer_syntax = meta.get("TransferSyntaxUID")
    if not transfer_syntax:
        raise ImportRefused("missing file meta information (no TransferSyntaxUID)")
    if not UID(transfer_syntax).is_transfer_syntax:
        raise ImportRefused("the file meta TransferSyntaxUID is not a known transfer syntax")
    return UID(transfer_syntax)


def _check_inflated_size(data: bytes, limit: int) -> None:
    """Inflate with a ceiling before pydicom inflates without one: a deflate bomb stops here."""
    meta_length = struct.unpack("<I", data[140:144])[0] if data[132:136] == b"\x02\x00\x00\x00" else None
    if meta_length is None:
        raise ImportRefused("deflated file without a file meta group length")
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data[144 + meta_length :], limit + 1)
    except zlib.error:
        raise ImportRefused("deflated data is corrupt") from None
    if len(inflated) > limit or inflater.unconsumed_tail:
        raise ImportRefused(f"deflated data expands beyond {limit} bytes (a deflate bomb?)")


def _parse(data: bytes) -> Dataset:
    try:
        return dcmread(io.BytesIO(data))
    except RecursionError:
        raise ImportRefused("sequences are nested too deeply to read") from None
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, struct.error, OSError) as exc:
        raise ImportRefused(f"unreadable DICOM data: {scrub_message(exc)}") from None


def _check_declared_lengths(ds: Dataset) -> None:
    """pydicom reads a value short without complaint when the file ends early; a declared length of
    gigabytes in a small file is a corrupt (or hostile) file, refused here."""
    for tag in list(ds.keys()):  # tags: iterating the Dataset itself would decode every element
        raw = ds.get_item(tag)
        declared = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if isinstance(value, bytes) and declared not in (None, UNDEFINED_LENGTH) and len(value) < declared:
            if tag == PIXEL_DATA_TAG:
                raise ImportRefused(f"truncated pixel data: {len(value)} of {declared} bytes")
            raise ImportRefused(
                f"element ({tag.group:04X},{tag.element:04X}) declares {declared} bytes but the file holds {len(value)}"
            )


def _check_identity(ds: Dataset) -> None:
    for keyword in IDENTITY_UIDS:
        value = ds.get(keyword)
        if not value:
            raise ImportRefused(f"{keyword} is missing")
        if not isinstance(value, str) or len(value) > 64 or not LENIENT_UID_PATTERN.match(value):
            raise ImportRefused(f"{keyword} is not a valid UID (digits and dots, at most 64 characters)")


def _check_pixel_data(ds: Dataset, transfer_syntax: UID, limits: ImportLimits) -> None:
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        sop_class = UID(ds.get("SOPClassUID", "")).name or "unknown SOP class"
        raise ImportRefused(f"no pixel data ({ds.get('Modality', '?')}, {sop_class}): only images can be imported")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames, samples = int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel") or 1)
        int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        raise ImportRefused("the image has no valid Rows, Columns or BitsAllocated") from None
    count = rows * columns * frames * samples
    if count <= 0:
        raise ImportRefused(f"the image declares no pixels ({rows} x {columns}, {frames} frames)")
    if count > limits.max_pixels:
        raise ImportRefused(
            f"{rows} x {columns} x {frames} frames x {samples} samples exceed the limit of "
            f"{limits.max_pixels} (MEDVQA_IMPORT_MAX_PIXELS)"
        )
    if transfer_syntax.is_compressed:
        _check_decoder(transfer_syntax)
    elif "PixelData" in ds:
        expected = get_expected_length(ds, unit="bytes")  # knows YBR_FULL_422 subsampling and 1-bit packing
        stored = len(ds.PixelData)
        if stored < expected:
            raise ImportRefused(f"truncated pixel data: {stored} of {expected} bytes")


def _check_decoder(transfer_syntax: UID) -> None:
    from pydicom.pixels.decoders.base import get_decoder

    try:
        available = get_decoder(transfer_syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise ImportRefused(f"transfer syntax {transfer_syntax.name} ({transfer_syntax}) cannot be decoded here")


def decode_pixels(ds: Dataset) -> np.ndarray:
    """The stored pixel values (before any LUT), decoding compressed data; a corrupt stream is refused."""
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # decoders raise anything from ValueError to RuntimeError on corrupt streams
        name = UID(ds.file_meta.TransferSyntaxUID).name
        raise ImportRefused(f"pixel data cannot be decoded ({name}): {scrub_message(exc)}") from None


def scrub_message(exc: BaseException) -> str:
    """An exception's message on one line, with quoted values removed: parser messages may quote element
    values, and those may be identifiers."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = "; ".join(lines) or type(exc).__name__
    return re.sub(r"(['\"]).*?\1", "…", text)[:300]
