"""Decode one DICOM instance into 2-D frames in modality units, with the geometry needed to order them.

Classic images keep their geometry and rescale at the top level; enhanced multi-frame images keep them per
frame (or shared) in functional groups. `frame_item` hides that difference from the rest of the package.

Tags that only help to order or describe frames (InstanceNumber, positions, orientations) are read leniently: a
value that is not a finite number counts as absent, so one junk tag never stops a series from opening. What the
pixel values mean (the pixel module, the modality rescale, a palette) must be usable, or the instance raises a
FrameError that says which part is not: showing wrong values would be worse than showing none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, convert_color_space

from medvqa.errors import InvalidInput
from medvqa.imaging.reader import Decoded, pixel_key, scrub_message

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
YBR_FULL = ("YBR_FULL", "YBR_FULL_422")
GREY = ("MONOCHROME1", "MONOCHROME2")


class FrameError(InvalidInput, ValueError):
    """An instance cannot be decoded into image frames."""


@dataclass(frozen=True, eq=False)
class Frame:
    """One 2-D slice: float32 [H, W] in modality units, or [H, W, 3] RGB on 0..255."""

    pixels: np.ndarray = field(repr=False)
    sop_uid: str
    input_index: int  # position of the instance in the caller's list
    frame_index: int  # frame number inside its instance, from 0
    instance_number: int | None
    position: np.ndarray | None  # ImagePositionPatient of this frame, mm
    orientation: np.ndarray | None  # ImageOrientationPatient: row cosines then column cosines
    inversion_pivot: float | None  # MONOCHROME1 only: values v were replaced by pivot - v


def frame_item(dataset: pydicom.Dataset, frame: int, keyword: str) -> pydicom.Dataset | None:
    """The first item of functional-group sequence `keyword` for `frame`: per-frame first, then shared; None
    when there is none or the sequences are malformed."""
    try:
        per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
        if per_frame is not None and frame < len(per_frame):
            items = per_frame[frame].get(keyword)
            if items and isinstance(items[0], pydicom.Dataset):
                return items[0]
        shared = dataset.get("SharedFunctionalGroupsSequence")
        if shared:
            items = shared[0].get(keyword)
            if items and isinstance(items[0], pydicom.Dataset):
                return items[0]
    except Exception:  # a functional group that is not a sequence of items
        return None
    return None


def lenient_value(dataset: pydicom.Dataset, keyword: str) -> object:
    """The value of `keyword`, or None when it is absent or cannot even be converted from its bytes."""
    try:
        return dataset.get(keyword)
    except Exception:
        return None


def finite_numbers(value: object) -> list[float] | None:
    """Every value of a (multi-valued) numeric tag as a finite float, or None when any is not one."""
    if value is None or isinstance(value, bytes):
        return None
    items = [value] if isinstance(value, str | int | float) else value
    if not isinstance(items, Iterable):
        return None
    try:
        numbers = [float(item) for item in items]
    except (TypeError, ValueError, OverflowError):
        return None
    return numbers if numbers and all(math.isfinite(number) for number in numbers) else None


def lenient_number(dataset: pydicom.Dataset, keyword: str) -> float | None:
    """The first value of a numeric tag when it is a finite number; None when absent or junk."""
    numbers = finite_numbers(lenient_value(dataset, keyword))
    return numbers[0] if numbers else None


def lenient_int(dataset: pydicom.Dataset, keyword: str) -> int | None:
    number = lenient_number(dataset, keyword)
    return int(number) if number is not None and number.is_integer() and abs(number) < 2**63 else None


def read_frames(dataset: pydicom.Dataset, input_index: int, decoded: Sequence[Decoded] = ()) -> list[Frame]:
    """Decode every frame of `dataset` into modality units (grey) or RGB 0..255 (colour). `decoded`: pixels
    already decoded from the same pixel data (used when their `pixel_key` matches, instead of decoding again)."""
    sop_uid = str(dataset.get("SOPInstanceUID", ""))
    if not any(keyword in dataset for keyword in PIXEL_KEYWORDS):
        raise FrameError(f"instance {sop_uid or input_index} has no pixel data (e.g. a report or structured set)")
    stored, photometric, bits = _decode(dataset, sop_uid, decoded)
    number = lenient_int(dataset, "InstanceNumber")
    frames = []
    for index in range(stored.shape[0]):
        pixels, pivot = _to_values(stored[index], dataset, index, photometric, bits)
        if not np.isfinite(pixels).all():
            raise FrameError(f"instance {sop_uid}: pixel values are not all finite numbers (NaN or infinity)")
        position, orientation = _plane(dataset, index, multi_frame=stored.shape[0] > 1)
        frames.append(
            Frame(
                pixels=pixels,
                sop_uid=sop_uid,
                input_index=input_index,
                frame_index=index,
                instance_number=number,
                position=position,
                orientation=orientation,
                inversion_pivot=pivot,
            )
        )
    return frames


def _decode(dataset: pydicom.Dataset, sop_uid: str, decoded: Sequence[Decoded] = ()) -> tuple[np.ndarray, str, int]:
    """Stored values as [frames, H, W(, 3)], the photometric interpretation they are now in, and BitsStored.

    pydicom 3 already converts YBR_FULL(_422) to RGB while decoding (and JPEG codecs convert themselves); the
    decoder reports the resulting interpretation, so a conversion here only happens when it did not.
    """
    meta_group = dataset.get("file_meta", pydicom.Dataset())
    syntax = meta_group.get("TransferSyntaxUID") if isinstance(meta_group, pydicom.Dataset) else None
    if syntax is None:
        raise FrameError(f"instance {sop_uid} has no Transfer Syntax UID in its file meta; re-save it as a DICOM file")
    syntax = pydicom.uid.UID(str(syntax))
    key = pixel_key(dataset) if decoded else ()
    known = next((item for item in decoded if item.key == key), None)
    try:
        array, meta = (known.array, known.meta) if known else get_decoder(syntax).as_array(dataset)
        photometric = str(meta.get("photometric_interpretation", dataset.get("PhotometricInterpretation", "")))
        samples = int(meta.get("samples_per_pixel", 1))
        bits = int(meta.get("bits_stored") or dataset.BitsStored)
        frames = int(meta.get("number_of_frames", 1) or 1)
        if photometric in YBR_FULL:
            array = convert_color_space(array, photometric, "RGB")
            photometric = "RGB"
    except Exception as error:  # decoders raise anything from ValueError to RuntimeError on bad pixel modules
        name = syntax.name or str(syntax)
        raise FrameError(f"cannot decode the pixels of instance {sop_uid} ({name}): {_message(error)}") from error
    if frames == 1:
        array = array[np.newaxis]
    rows, columns = lenient_int(dataset, "Rows"), lenient_int(dataset, "Columns")
    expected_ndim = 3 if samples == 1 else 4
    if array.ndim != expected_ndim or array.shape[0] != frames or array.shape[1:3] != (rows, columns):
        raise FrameError(
            f"instance {sop_uid}: the decoded pixels ({'x'.join(map(str, array.shape))}) do not match Rows, Columns "
            f"and NumberOfFrames ({rows} x {columns}, {frames} frames)"
        )
    if samples not in (1, 3) or (samples == 3 and photometric != "RGB"):
        raise FrameError(f"instance {sop_uid}: photometric interpretation {photometric} is not supported")
    if not 1 <= bits <= 64:
        raise FrameError(f"instance {sop_uid}: BitsStored {bits} is not usable")
    return array, photometric, bits


def is_colour(dataset: pydicom.Dataset) -> bool:
    """Whether `read_frames` makes RGB frames ([H, W, 3]) of this instance rather than grey ones ([H, W])."""
    samples = lenient_int(dataset, "SamplesPerPixel")
    photometric = str(lenient_value(dataset, "PhotometricInterpretation") or "").strip().upper()
    return samples == 3 or photometric == "PALETTE COLOR"


def _message(error: BaseException) -> str:
    return scrub_message(error)


def _to_values(
    stored: np.ndarray, dataset: pydicom.Dataset, frame: int, photometric: str, bits: int
) -> tuple[np.ndarray, float | None]:
    """Modality LUT for grey (then MONOCHROME1 inverted), 0..255 scaling for colour and palettes."""
    sop_uid = str(dataset.get("SOPInstanceUID", ""))
    if photometric == "RGB":
        return (stored.astype(np.float32) * (255.0 / (2**bits - 1))), None
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(stored, dataset)
        except Exception as error:
            raise FrameError(
                f"instance {sop_uid}: a palette colour image without a usable colour lookup table ({_message(error)})"
            ) from error
        return rgb.astype(np.float32) * (255.0 / np.iinfo(rgb.dtype).max), None
    if photometric not in GREY:
        raise FrameError(f"photometric interpretation {photometric!r} is not supported for grey images")
    source = frame_item(dataset, frame, "PixelValueTransformationSequence") or dataset
    try:
        _check_rescale(source)
        values = np.asarray(apply_modality_lut(stored, source), dtype=np.float32)
        pivot = _value_range_sum(dataset, source, bits) if photometric == "MONOCHROME1" else None
    except FrameError:
        raise
    except Exception as error:
        raise FrameError(
            f"instance {sop_uid}: the modality rescale or lookup table is not usable ({_message(error)})"
        ) from error
    if pivot is None:
        return values, None
    return pivot - values, pivot


def _check_rescale(source: pydicom.Dataset) -> None:
    """RescaleSlope and RescaleIntercept, when present, must be finite numbers: they give pixels their meaning."""
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        value = lenient_value(source, keyword)
        if value not in (None, "") and finite_numbers(value) is None:
            raise FrameError(f"{keyword} is not a number, so the pixel values have no known meaning")


def _value_range_sum(dataset: pydicom.Dataset, source: pydicom.Dataset, bits: int) -> float:
    """low + high of the values the stored bits can reach after the modality LUT: the MONOCHROME1 mirror."""
    signed = lenient_int(dataset, "PixelRepresentation") == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    ends = np.asarray(apply_modality_lut(np.array([low, high], dtype=np.int64), source), dtype=np.float64)
    return float(ends.min() + ends.max())


def _plane(dataset: pydicom.Dataset, frame: int, multi_frame: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Position and orientation of one frame; a multi-frame instance needs per-frame positions to be ordered."""
    position_item = frame_item(dataset, frame, "PlanePositionSequence")
    orientation_item = frame_item(dataset, frame, "PlaneOrientationSequence")
    position = lenient_value(position_item, "ImagePositionPatient") if position_item else None
    if position is None and not multi_frame:
        position = lenient_value(dataset, "ImagePositionPatient")
    orientation = lenient_value(orientation_item or dataset, "ImageOrientationPatient") or lenient_value(
        dataset, "ImageOrientationPatient"
    )
    return _vector(position, 3), _vector(orientation, 6)


def _vector(value: object, length: int) -> np.ndarray | None:
    """A vector of `length` finite numbers, or None for anything else (absent, junk text, NaN, infinity)."""
    if isinstance(value, str):
        return None
    numbers = finite_numbers(value)
    if numbers is None or len(numbers) != length:
        return None
    return np.asarray(numbers, dtype=np.float64)
