"""Reading one file into a checked pydicom Dataset. Every refusal is one line that says why, names no
patient identifier, and comes before memory is spent on what the file merely declares."""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import re
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin
from pydicom import config, dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import as_pixel_options, get_expected_length
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, MediaStorageDirectoryStorage

from medvqa.errors import ImportRefused, ImportSkipped

# pydicom's value-validation warnings quote element values (possibly identifiers) into logs; the checks that
# matter for import are made here, so those warnings are turned off for the process, and pydicom's own log
# (structure notes such as "expected explicit VR") is kept to errors.
config.settings.reading_validation_mode = config.IGNORE
logging.getLogger("pydicom").setLevel(logging.ERROR)
# Pillow inflates PNG text chunks while reading the header, up to 64 MiB in all by default: a text-chunk bomb would
# cost that much before any size check. Teaching images carry no text worth a megabyte.
PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, 1 << 20)
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
LENIENT_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # leading zeros: a common vendor quirk, harmless
UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA_TAG = 0x7FE00010
INFLATE_INPUT_CHUNK = 64 << 10
INFLATE_OUTPUT_CHUNK = 1 << 20
IDENTITY_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07")
PIXEL_MODULE = (
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "ExtendedOffsetTable",
)


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
    check_declared_lengths(ds)
    if transfer_syntax != DeflatedExplicitVRLittleEndian:  # offsets of a deflated file are in the inflated stream
        _check_no_zip_appended(data, ds)
    if any(tag.group == 0 for tag in list(ds.keys())):  # iterating a Dataset gives elements, not tags
        raise ImportRefused("command-set elements (0000,xxxx) do not belong in a stored instance")
    _check_identity(ds)
    _check_pixel_data(ds, transfer_syntax, limits)
    return ds


def _check_no_zip_appended(data: bytes, ds: Dataset) -> None:
    """A DICOM file with a zip archive, or a zip end record, after its pixel data is a polyglot (zip tools open
    it as an archive): refused, saying so. Other bytes after the pixel data are left to the other checks."""
    for keyword in PIXEL_KEYWORDS:
        raw = ds.get_item(keyword)
        if raw is None:
            continue
        value, start = getattr(raw, "value", None), getattr(raw, "value_tell", None)
        if not isinstance(value, bytes) or not isinstance(start, int):
            return
        undefined = getattr(raw, "length", 0) == UNDEFINED_LENGTH
        end = start + len(value) + (8 if undefined else 0)  # an undefined length ends with a delimiter item
        if any(data.find(signature, end) >= 0 for signature in ZIP_SIGNATURES):
            raise ImportRefused(
                f"a zip archive or zip end record follows the pixel data ({len(data) - end} bytes appended)"
            )
        return


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
    """Inflate in chunks, counting and discarding, before pydicom inflates without a ceiling: a deflate bomb
    stops here having held no more than one chunk of its output (the file's own bytes aside)."""
    if data[132:136] != b"\x02\x00\x00\x00" or len(data) < 144:
        raise ImportRefused("deflated file without a file meta group length")
    (meta_length,) = struct.unpack("<I", data[140:144])
    body = memoryview(data)[144 + meta_length :]
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        for start in range(0, len(body), INFLATE_INPUT_CHUNK):
            pending: bytes | memoryview = body[start : start + INFLATE_INPUT_CHUNK]
            while pending and not inflater.eof:
                total += len(inflater.decompress(pending, INFLATE_OUTPUT_CHUNK))
                if total > limit:
                    raise ImportRefused(f"deflated data expands beyond {limit} bytes (a deflate bomb?)")
                pending = inflater.unconsumed_tail
            if inflater.eof:
                break
    except zlib.error:
        raise ImportRefused("deflated data is corrupt") from None


def check_image_size(data: bytes, limits: ImportLimits) -> None:
    """A PNG or JPEG is refused from its header when decoding it would take more than the file limit (or the
    pixel limit): nothing is decoded, so a decompression bomb costs its own bytes and a constant."""
    if not data.startswith(IMAGE_SIGNATURES):
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as opened:
                (width, height), mode = opened.size, opened.mode
    except Image.DecompressionBombError:
        raise ImportRefused("the image declares too many pixels (a decompression bomb?)") from None
    except Exception:
        return  # not a readable image: the conversion refuses it with its reason
    per_pixel = max(3, Image.getmodebands(mode) * _bytes_per_band(mode))
    decoded = width * height * per_pixel
    if width * height * 3 > limits.max_pixels:
        raise ImportRefused(
            f"{width} x {height} image exceeds the limit of {limits.max_pixels} samples (MEDVQA_IMPORT_MAX_PIXELS)"
        )
    if decoded > limits.max_file_bytes:
        raise ImportRefused(
            f"{width} x {height} image would take {decoded} bytes decoded, beyond {limits.max_file_bytes} "
            "(MEDVQA_IMPORT_MAX_FILE_BYTES; a decompression bomb?)"
        )


def _bytes_per_band(mode: str) -> int:
    if mode in ("I", "F", "RGBa"):
        return 4
    if mode.startswith("I;16"):
        return 2
    return 1


def _parse(data: bytes) -> Dataset:
    try:
        return dcmread(io.BytesIO(data))
    except RecursionError:
        raise ImportRefused("sequences are nested too deeply to read") from None
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, struct.error, OSError) as exc:
        raise ImportRefused(f"unreadable DICOM data: {scrub_message(exc)}") from None


def check_declared_lengths(ds: Dataset) -> None:
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


@dataclass(frozen=True, eq=False)
class Decoded:
    """Pixels decoded once, with what they were decoded from (`pixel_key`), so that reading the same pixel data
    back (the render check) need not decode them again."""

    key: tuple[object, ...]
    array: np.ndarray
    meta: dict[str, Any]


_captured: contextvars.ContextVar[list[Decoded] | None] = contextvars.ContextVar("medvqa_decoded", default=None)


@contextlib.contextmanager
def capture_decoded() -> Iterator[list[Decoded]]:
    """Within the block, every `decode_pixels` also keeps what it decoded in the list yielded."""
    captured: list[Decoded] = []
    token = _captured.set(captured)
    try:
        yield captured
    finally:
        _captured.reset(token)


def pixel_key(ds: Dataset) -> tuple[object, ...]:
    """Everything a decoder's output depends on: the transfer syntax, the pixel data bytes (compared by value)
    and the pixel module's attributes as stored."""
    meta = ds.get("file_meta")
    values: list[object] = [str(meta.get("TransferSyntaxUID", "")) if isinstance(meta, Dataset) else ""]
    for keyword in (*PIXEL_KEYWORDS, *PIXEL_MODULE):
        try:
            value = ds.get(keyword)
            values.append(value if isinstance(value, bytes) or value is None else str(value))
        except Exception:
            values.append(("unreadable", keyword))
    return tuple(values)


def decode_pixels(ds: Dataset) -> np.ndarray:
    """The stored pixel values (before any LUT), decoding compressed data; a corrupt stream is refused.
    The same array as `ds.pixel_array` (the decoder pydicom's property uses, with the same options)."""
    try:
        syntax = UID(ds.file_meta.TransferSyntaxUID)
        array, meta = get_decoder(syntax).as_array(ds, validate=True, raw=False, **as_pixel_options(ds))
    except Exception as exc:  # decoders raise anything from ValueError to RuntimeError on corrupt streams
        name = UID(ds.file_meta.TransferSyntaxUID).name
        raise ImportRefused(f"pixel data cannot be decoded ({name}): {scrub_message(exc)}") from None
    captured = _captured.get()
    if captured is not None:
        captured.append(Decoded(pixel_key(ds), array, dict(meta)))
    return np.asarray(array)


def scrub_message(exc: BaseException) -> str:
    """An exception's message on one line, with quoted values removed: parser messages may quote element
    values, and those may be identifiers."""
    try:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    except Exception:  # an exception whose __str__ fails
        lines = []
    text = "; ".join(lines) or type(exc).__name__
    text = re.sub(r"['\"].*['\"]", "…", text)  # from the first quote to the last: bytes literals nest quotes
    return one_line(re.sub(r"['\"].*", "…", text))[:300]


def one_line(text: str) -> str:
    """`text` safe to print on one line: control, format and separator characters (newlines, terminal escapes,
    bidirectional overrides, spaces other than ' ') and undecodable bytes of a file name are written as escapes."""
    out = []
    for char in text:
        if not char.isprintable() and char != " ":  # controls, format, separators other than space, unassigned
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)
