"""Hostile inputs for `medvqa import`, built from real DICOM, zip and PNG bytes, one function per kind, and a
folder that mixes many kinds with valid files (`write_mixed_folder`), each with the outcome the import must give.

Every hostile kind is a class the import must refuse with one line, whatever its details: an encrypted zip
member, a broken central directory, a member with a broken local header, a zip inside a zip, a path-traversal
member name, a zip with absurdly many members, a zip bomb, a deflate bomb, a PNG decompression bomb, a palette
colour image without its lookup table, a multi-frame file whose frame count disagrees with its data, a DICOMDIR
pointing outside its folder or at missing files, symbolic links leading outside the folder, FIFOs and sockets.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.phi_factory import encode, make_phi_slice

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class Expected:
    """The input as its report line names it (relative to the imported folder), and the status it must get."""

    name: str
    status: str  # imported, duplicate, skipped or refused
    reason: str = ""  # a fragment the refusal reason must contain ("" when any reason will do)


# --- DICOM ----------------------------------------------------------------------------------------------------------


def valid_dicom(index: int = 0, study: str = "", rows: int = 16, columns: int = 16) -> bytes:
    """A de-identifiable CT slice full of fake PHI; `study` makes it part of a study of its own."""
    ds = make_phi_slice(index, rows=rows, columns=columns)
    if study:
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.{study}"
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.{study}.1"
    return encode(ds)


def set_raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Put bytes into an element as a file would hold them, bypassing pydicom's validation (junk values)."""
    tag = Tag(pydicom.datadict.tag_for_keyword(keyword))
    if len(value) % 2:
        value += b" "
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def junk_numbers(index: int = 40) -> bytes:
    """InstanceNumber, SliceThickness, WindowCenter and PixelSpacing hold text where numbers belong: tags that
    describe the image, not what its pixels mean. Such a file must import and open."""
    ds = make_phi_slice(index)
    set_raw(ds, "InstanceNumber", "IS", b"abc")
    set_raw(ds, "SliceThickness", "DS", b"thick")
    set_raw(ds, "WindowCenter", "DS", b"xx\\40")
    set_raw(ds, "WindowWidth", "DS", b"nan")
    set_raw(ds, "PixelSpacing", "DS", b"1e999\\wide")
    set_raw(ds, "ImagePositionPatient", "DS", b"0\\0\\here")
    return encode(ds)


def junk_rescale(index: int = 41) -> bytes:
    """RescaleSlope holds text: the pixel values have no known meaning."""
    ds = make_phi_slice(index)
    set_raw(ds, "RescaleSlope", "DS", b"steep")
    return encode(ds)


def palette_without_lut(index: int = 42) -> bytes:
    """PALETTE COLOR with its lookup table descriptors and data removed: it cannot be shown."""
    ds = make_phi_slice(index)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.zeros((16, 16), dtype=np.uint8).tobytes()
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    return encode(ds)


def frame_count_beyond_data(index: int = 43) -> bytes:
    """NumberOfFrames says 5, the pixel data holds 2 frames."""
    ds = make_phi_slice(index)
    ds.NumberOfFrames = 5
    ds.PixelData = np.zeros((2, 16, 16), dtype=np.uint16).tobytes()
    return encode(ds)


def encapsulated_frame_count_mismatch(index: int = 44) -> bytes:
    """An RLE multi-frame whose NumberOfFrames (3) disagrees with its two encoded fragments."""
    from pydicom.pixels.encoders import RLELosslessEncoder

    ds = make_phi_slice(index)
    frame = np.arange(256, dtype=np.uint16).reshape(16, 16)
    fragments = [
        RLELosslessEncoder.encode(
            frame,
            rows=16,
            columns=16,
            samples_per_pixel=1,
            bits_allocated=16,
            bits_stored=16,
            pixel_representation=0,
            photometric_interpretation="MONOCHROME2",
            number_of_frames=1,
        )
    ] * 2
    from pydicom.encaps import encapsulate

    ds.NumberOfFrames = 3
    ds.BitsStored, ds.HighBit = 16, 15
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.5"
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    return encode(ds)


def dicom_with_zip_tail(index: int = 45) -> bytes:
    """A DICOM file whose last bytes are a zip end-of-central-directory record, inside a well-formed trailing
    padding element: zipfile.is_zipfile says zip, its content says DICOM; a polyglot, refused as one."""
    ds = make_phi_slice(index)
    ds.DataSetTrailingPadding = b"\x00" * 10 + b"PK\x05\x06" + b"\x00" * 18
    return encode(ds)


def dicom_with_appended_zip_end(index: int = 48) -> bytes:
    """A DICOM file with a zip end-of-central-directory record appended after its data set: zipfile.is_zipfile
    says zip (an empty one: the old import dropped the file without a line); its content is a DICOM file with a
    zip appended, refused as such (never opened as a zip)."""
    return valid_dicom(index) + b"PK\x05\x06" + b"\x00" * 18


def polyglot(index: int = 46) -> bytes:
    """A DICOM file whose preamble starts with a zip local file header."""
    data = bytearray(valid_dicom(index))
    data[:4] = b"PK\x03\x04"
    return bytes(data)


def deflate_bomb(inflated: int = 64 << 20) -> bytes:
    """A valid preamble and file meta declaring Deflated Explicit VR, then `inflated` zeros deflated (~1000x)."""
    meta = make_phi_slice().file_meta
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = bytearray()
    zeros = b"\x00" * (1 << 20)
    for _ in range(inflated >> 20):
        body += compressor.compress(zeros)
    return buffer.getvalue() + bytes(body) + compressor.flush()


def truncated_dicom(index: int = 47) -> bytes:
    return valid_dicom(index)[:-100]


# --- images ---------------------------------------------------------------------------------------------------------


def valid_png(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 32), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A grey PNG declaring width x height pixels of zeros, streamed (never held whole): about 1/1000 of its
    decoded size on disk."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte 0, then the row
    rows_per_feed = max(1, (8 << 20) // len(row))
    data = bytearray()
    for start in range(0, height, rows_per_feed):
        data += compressor.compress(row * min(rows_per_feed, height - start))
    data += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bytes(data)) + chunk(b"IEND", b"")


# --- zip archives ---------------------------------------------------------------------------------------------------


def zip_bytes(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _central_headers(data: bytes) -> Iterator[int]:
    start = 0
    while (at := data.find(b"PK\x01\x02", start)) >= 0:
        yield at
        start = at + 4


def encrypted_zip(member: bytes, name: str = "secret.dcm") -> bytes:
    """A zip whose one member is flagged encrypted (general purpose bit 0) in both of its headers."""
    data = bytearray(zip_bytes({name: member}, zipfile.ZIP_STORED))
    data[6] |= 0x01  # local header flags
    for at in _central_headers(bytes(data)):
        data[at + 8] |= 0x01
    return bytes(data)


def broken_central_directory(member: bytes) -> bytes:
    """A zip whose central directory has been overwritten (its end record still there, pointing at junk)."""
    data = bytearray(zip_bytes({"slice.dcm": member}))
    for at in _central_headers(bytes(data)):
        data[at : at + 46] = b"\xee" * 46
    return bytes(data)


def cut_zip(member: bytes) -> bytes:
    """A zip cut before its central directory: no end record at all."""
    data = zip_bytes({"slice.dcm": member})
    return data[: data.find(b"PK\x01\x02")]


def broken_local_header(member: bytes, name: str = "slice.dcm") -> bytes:
    """A zip whose member's local header signature is damaged (its central directory is intact)."""
    data = bytearray(zip_bytes({name: member}))
    data[0:4] = b"PK\x03\x04"  # the archive still starts like a zip
    data[26:28] = struct.pack("<H", 0xFFFF)  # the local name length now runs past the member's data
    return bytes(data)


def zip_with_many_members(count: int) -> bytes:
    """A zip of `count` tiny members: absurdly many for an import."""
    return zip_bytes({f"m{index}.txt": b"" for index in range(count)}, zipfile.ZIP_STORED)


def zip_bomb_member(inflated: int = 256 << 20) -> bytes:
    """A zip whose one member deflates `inflated` zeros (about 1000x)."""
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("bomb.dcm", "w", force_zip64=True) as member,
    ):
        zeros = b"\x00" * (1 << 20)
        for _ in range(inflated >> 20):
            member.write(zeros)
    return buffer.getvalue()


def lying_size_member(inflated: int = 8 << 20) -> bytes:
    """A zip whose member declares a small size (and ratio) but inflates far more: the stream, not the header,
    decides."""
    data = bytearray(zip_bytes({"liar.dcm": b"\x00" * inflated}))
    declared = 64 << 10
    struct.pack_into("<I", data, 22, declared)  # local header uncompressed size
    for at in _central_headers(bytes(data)):
        struct.pack_into("<I", data, at + 24, declared)
    return bytes(data)


# --- DICOMDIR -------------------------------------------------------------------------------------------------------


def dicomdir(file_ids: list[list[str]]) -> bytes:
    """A DICOMDIR with one IMAGE record per file ID (components as written, even '..' or absolute ones)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MEDIA_STORAGE_DIRECTORY
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.FileSetID = "TEST"
    records = []
    for file_id in file_ids:
        record = Dataset()
        record.DirectoryRecordType = "IMAGE"
        set_raw(record, "ReferencedFileID", "CS", "\\".join(file_id).encode())
        record.ReferencedSOPClassUIDInFile = "1.2.840.10008.5.1.4.1.1.2"
        record.ReferencedSOPInstanceUIDInFile = generate_uid()
        records.append(record)
    ds.DirectoryRecordSequence = Sequence(records)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# --- the mixed folder -----------------------------------------------------------------------------------------------


def write_mixed_folder(folder: Path, outside: Path) -> list[Expected]:
    """Valid files and many hostile kinds in one folder tree (and `outside` it, a valid DICOM that links point
    at); returns what the import must say about each input, named relative to `folder`."""
    folder.mkdir(parents=True)
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "outside.dcm").write_bytes(valid_dicom(90, study="90"))
    expected: list[Expected] = []

    def put(name: str, data: bytes, status: str, reason: str = "", shown: str | None = None) -> None:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected.append(Expected(shown or name, status, reason))

    # valid inputs: imported
    for index in range(3):
        put(f"ct/slice{index}.dcm", valid_dicom(index), "imported")
    put("png/teaching.png", valid_png(), "imported")
    put("junk/junk-numbers.dcm", junk_numbers(), "imported")
    put("names/new\nline.dcm", valid_dicom(5), "imported", shown="names/new\\x0aline.dcm")
    put("zips/good.zip", zip_bytes({"a/slice.dcm": valid_dicom(6)}), "imported", shown="zips/good.zip!a/slice.dcm")
    put("ct/DICOMDIR", dicomdir([["SLICE0.DCM"], ["slice1.dcm"]]), "skipped", "DICOMDIR")
    (folder / "links").mkdir()
    os.symlink("../ct/slice0.dcm", folder / "links" / "inside.dcm")
    expected.append(Expected("links/inside.dcm", "skipped", "inside the imported folder"))
    os.symlink("..", folder / "links" / "loop")
    expected.append(Expected("links/loop", "skipped", "inside the imported folder"))

    # hostile inputs: exactly one refusal line each
    member = valid_dicom(7)
    put("zips/encrypted.zip", encrypted_zip(member), "refused", "encrypted", shown="zips/encrypted.zip!secret.dcm")
    put("zips/broken-cd.zip", broken_central_directory(member), "refused", "zip")
    put("zips/cut.zip", cut_zip(member), "refused", "end of central directory")
    put(
        "zips/broken-local.zip",
        broken_local_header(member),
        "refused",
        "zip member",
        shown="zips/broken-local.zip!slice.dcm",
    )
    put(
        "zips/nested.zip",
        zip_bytes({"inner.zip": zip_bytes({"x.dcm": member})}),
        "refused",
        "zip archive inside",
        shown="zips/nested.zip!inner.zip",
    )
    put(
        "zips/traversal.zip",
        zip_bytes({"../../escape.dcm": member}),
        "refused",
        "outside the archive",
        shown="zips/traversal.zip!../../escape.dcm",
    )
    put("zips/many.zip", zip_with_many_members(500), "refused", "entries")
    put("zips/bomb.zip", zip_bomb_member(64 << 20), "refused", "zip bomb", shown="zips/bomb.zip!bomb.dcm")
    put("zips/liar.zip", lying_size_member(), "refused", "zip member", shown="zips/liar.zip!liar.dcm")
    put("bombs/deflate.dcm", deflate_bomb(16 << 20), "refused", "deflate")
    put("bombs/bomb.png", png_bomb(4000, 4000), "refused", "decompression bomb")
    put("render/palette.dcm", palette_without_lut(), "refused", "palette")
    put("render/frames.dcm", frame_count_beyond_data(), "refused", "")
    put("render/rle-frames.dcm", encapsulated_frame_count_mismatch(), "refused", "")
    put("odd/polyglot.dcm", polyglot(), "refused", "ambiguous")
    put("tail/appended-zip-end.dcm", dicom_with_appended_zip_end(), "refused", "zip end record follows the pixel")
    put("tail/zip-tail.dcm", dicom_with_zip_tail(), "refused", "zip end record follows the pixel")
    put("odd/truncated.dcm", truncated_dicom(), "refused", "truncated")
    put("odd/notes.txt", b"Patient Phisurname said hello\n", "refused", "not a DICOM file")
    put("odd/empty.dcm", b"", "refused", "empty")
    put("odd/small.dcm", valid_dicom(8, rows=8, columns=8), "refused", "differs from the rest of its series")
    put("dirs/DICOMDIR", dicomdir([["..", "..", "outside", "outside.dcm"], ["MISSING.DCM"]]), "refused", "DICOMDIR")
    os.symlink(outside / "outside.dcm", folder / "links" / "outside.dcm")
    expected.append(Expected("links/outside.dcm", "refused", "outside the imported folder"))
    os.symlink("/dev/zero", folder / "links" / "zero")
    expected.append(Expected("links/zero", "refused", "outside the imported folder"))
    os.symlink("nowhere.dcm", folder / "links" / "dangling.dcm")
    expected.append(Expected("links/dangling.dcm", "refused", "broken symbolic link"))
    os.mkfifo(folder / "odd" / "fifo.dcm")
    expected.append(Expected("odd/fifo.dcm", "refused", "FIFO"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(folder / "odd" / "socket.dcm"))
    sock.close()
    expected.append(Expected("odd/socket.dcm", "refused", "socket"))
    return expected
