"""Pixel Data that holds the image and nothing else.

Native (uncompressed) data is rewritten from the decoded values: bits above BitsStored (where old devices kept
overlays) are cleared and bytes past the image are dropped; YBR colour, which pydicom decodes to RGB, is stored as
RGB. Encapsulated data is taken frame by frame: JPEG and JPEG-LS keep their coding segments but lose comments and
application segments (COM, APPn; a bare JFIF or Adobe header stays), JPEG 2000 loses its comment segments (COM)
and anything after the end of the codestream, RLE is encoded again from the decoded values, and the offset table
is rebuilt empty (its numbers could carry bytes too). The cleaned stream must decode to exactly the values of the
original, otherwise the instance is stored uncompressed (Explicit VR Little Endian) from the decoded values.
"""

from __future__ import annotations

import hashlib

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, RLELossless

from medvqa.imaging.reader import decode_pixels

JPEG_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"}
JPEG_LS_SYNTAXES = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
J2K_SYNTAXES = {
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
}
YBR = ("YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")


class PixelStreamError(ValueError):
    """A codestream this module cannot take apart safely (the caller stores the decoded values instead)."""


def clean_pixel_data(ds: Dataset, pixels: np.ndarray) -> None:
    """Replace ds.PixelData (and the transfer syntax where needed) by a stream that holds only the image whose
    decoded values are `pixels`."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if not syntax.is_compressed:
        store_native(ds, pixels)
        return
    try:
        if syntax == RLELossless:
            ds.compress(RLELossless, np.asarray(pixels), encoding_plugin="pydicom", generate_instance_uid=False)
        else:
            _reencapsulate(ds, syntax)
        # The one extra decode cleaning costs; decode_pixels keeps it, so the render check reads these back.
        if _digest(decode_pixels(ds)) == _digest(pixels):
            return
    except Exception:
        pass
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    store_native(ds, pixels)


def _digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(
        f"{pixels.dtype.str}{pixels.shape}".encode() + np.ascontiguousarray(pixels).tobytes()
    ).hexdigest()


def store_native(ds: Dataset, pixels: np.ndarray) -> None:
    if ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # values are written little-endian below
    bits_allocated, bits_stored = int(ds.BitsAllocated), int(ds.BitsStored)
    if bits_allocated == 1:  # packed bits: keep exactly the bytes the image needs
        ds.PixelData = bytes(ds.PixelData[: get_expected_length(ds, unit="bytes")]).ljust(2, b"\x00")
        return
    values = np.asarray(pixels)
    if str(ds.get("PhotometricInterpretation", "")) in YBR and values.ndim >= 3 and values.shape[-1] == 3:
        ds.PhotometricInterpretation = "RGB"  # pydicom decoded it to RGB: stored as what it now is
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
    stored = values.astype(dtype, copy=True)
    if not signed and bits_stored < bits_allocated:
        stored &= np.asarray((1 << bits_stored) - 1, dtype=dtype)
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        ds.PlanarConfiguration = 0  # decoded arrays are pixel-interleaved
    data = stored.tobytes()
    ds.PixelData = data + (b"\x00" if len(data) % 2 else b"")
    ds["PixelData"].VR = "OB" if bits_allocated <= 8 else "OW"


def _reencapsulate(ds: Dataset, syntax: UID) -> None:
    frames = int(ds.get("NumberOfFrames") or 1)
    cleaned = []
    for frame in generate_frames(ds.PixelData, number_of_frames=frames):
        if syntax in JPEG_SYNTAXES or syntax in JPEG_LS_SYNTAXES:
            cleaned.append(clean_jpeg(frame, jpeg_ls=syntax in JPEG_LS_SYNTAXES))
        elif syntax in J2K_SYNTAXES:
            cleaned.append(clean_j2k(frame))
        else:
            raise PixelStreamError(f"no cleaner for {syntax.name}")
    ds.PixelData = encapsulate(cleaned, has_bot=False)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            del ds[keyword]


def clean_jpeg(data: bytes, jpeg_ls: bool = False) -> bytes:
    """A JPEG (or JPEG-LS) codestream without COM and APPn segments (but a bare JFIF or Adobe header), ending at
    its EOI marker."""
    if data[:2] != b"\xff\xd8":
        raise PixelStreamError("not a JPEG codestream")
    out, i = bytearray(b"\xff\xd8"), 2
    while i < len(data) - 1:
        if data[i] != 0xFF:
            raise PixelStreamError("JPEG marker expected")
        while i + 1 < len(data) and data[i + 1] == 0xFF:  # fill bytes
            i += 1
        marker = data[i + 1]
        i += 2
        if marker == 0xD9:
            out += b"\xff\xd9"
            return bytes(out)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            out += bytes((0xFF, marker))
            continue
        length = int.from_bytes(data[i : i + 2], "big")
        if length < 2 or i + length > len(data):
            raise PixelStreamError("JPEG segment runs past the end")
        segment = data[i : i + length]
        i += length
        if _keep_segment(marker, segment):
            out += bytes((0xFF, marker)) + segment
        if marker == 0xDA:  # entropy-coded data follows the scan header, up to the next real marker
            end = _scan_end(data, i, jpeg_ls)
            out += data[i:end]
            i = end
    raise PixelStreamError("JPEG codestream without an end marker")


def _keep_segment(marker: int, segment: bytes) -> bool:
    if marker == 0xFE:  # COM
        return False
    if marker == 0xE0:  # APP0: a JFIF header without a thumbnail only
        return len(segment) == 16 and segment[2:7] == b"JFIF\x00" and segment[14:16] == b"\x00\x00"
    if marker == 0xEE:  # APP14: the Adobe colour-transform header only
        return len(segment) == 14 and segment[2:7] == b"Adobe"
    return not 0xE1 <= marker <= 0xEF


def _scan_end(data: bytes, start: int, jpeg_ls: bool) -> int:
    i = start
    while i < len(data) - 1:
        if data[i] == 0xFF:
            following = data[i + 1]
            is_marker = following >= 0x80 if jpeg_ls else following not in (0x00, *range(0xD0, 0xD8))
            if is_marker:
                return i
            i += 2
        else:
            i += 1
    return len(data)


def clean_j2k(data: bytes) -> bytes:
    """A JPEG 2000 codestream without COM segments (main and tile-part headers), ending at its EOC marker."""
    if data[:4] == b"\x00\x00\x00\x0c" and data[4:8] == b"jP  ":
        data = _jp2_codestream(data)
    if data[:2] != b"\xff\x4f":
        raise PixelStreamError("not a JPEG 2000 codestream")
    out, i = bytearray(b"\xff\x4f"), 2
    while i < len(data) - 1:
        marker = data[i : i + 2]
        if marker == b"\xff\xd9":
            out += marker
            return bytes(out)
        if marker == b"\xff\x90":  # SOT: a tile-part of Psot bytes (0: up to EOC)
            header = data[i : i + 12]
            psot = int.from_bytes(header[6:10], "big")
            end = i + psot if psot else len(data) - 2
            j, kept = i + 12, bytearray()
            while data[j : j + 2] != b"\xff\x93":
                length = int.from_bytes(data[j + 2 : j + 4], "big")
                if length < 2 or j + 2 + length > end:
                    raise PixelStreamError("JPEG 2000 tile-part header runs past its end")
                if data[j : j + 2] != b"\xff\x64":
                    kept += data[j : j + 2 + length]
                j += 2 + length
            body = data[j:end]
            size = 12 + len(kept) + len(body) if psot else 0
            out += header[:6] + size.to_bytes(4, "big") + header[10:] + kept + body
            i = end
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker[0] != 0xFF or length < 2 or i + 2 + length > len(data):
            raise PixelStreamError("JPEG 2000 main header segment runs past the end")
        if marker != b"\xff\x64":
            out += data[i : i + 2 + length]
        i += 2 + length
    raise PixelStreamError("JPEG 2000 codestream without an end marker")


def _jp2_codestream(data: bytes) -> bytes:
    """The contiguous codestream box of a JP2 file (its other boxes, which may hold text, are dropped)."""
    i = 0
    while i + 8 <= len(data):
        size, kind = int.from_bytes(data[i : i + 4], "big"), data[i + 4 : i + 8]
        header = 8
        if size == 1:
            size, header = int.from_bytes(data[i + 8 : i + 16], "big"), 16
        elif size == 0:
            size = len(data) - i
        if kind == b"jp2c":
            return data[i + header : i + size]
        if size < header:
            break
        i += size
    raise PixelStreamError("JP2 file without a codestream box")
