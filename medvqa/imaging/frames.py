"""Decode one DICOM instance into 2-D frames in modality units, with the geometry needed to order them.

Classic images keep their geometry and rescale at the top level; enhanced multi-frame images keep them per
frame (or shared) in functional groups. `frame_item` hides that difference from the rest of the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, convert_color_space

from medvqa.errors import InvalidInput

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
    """The first item of functional-group sequence `keyword` for `frame`: per-frame first, then shared."""
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        items = per_frame[frame].get(keyword)
        if items:
            return items[0]  # type: ignore[no-any-return]
    shared = dataset.get("SharedFunctionalGroupsSequence")
    if shared:
        items = shared[0].get(keyword)
        if items:
            return items[0]  # type: ignore[no-any-return]
    return None


def read_frames(dataset: pydicom.Dataset, input_index: int) -> list[Frame]:
    """Decode every frame of `dataset` into modality units (grey) or RGB 0..255 (colour)."""
    sop_uid = str(dataset.get("SOPInstanceUID", ""))
    if not any(keyword in dataset for keyword in PIXEL_KEYWORDS):
        raise FrameError(f"instance {sop_uid or input_index} has no pixel data (e.g. a report or structured set)")
    stored, photometric = _decode(dataset, sop_uid)
    number = dataset.get("InstanceNumber")
    frames = []
    for index in range(stored.shape[0]):
        pixels, pivot = _to_values(stored[index], dataset, index, photometric)
        position, orientation = _plane(dataset, index, multi_frame=stored.shape[0] > 1)
        frames.append(
            Frame(
                pixels=pixels,
                sop_uid=sop_uid,
                input_index=input_index,
                frame_index=index,
                instance_number=int(number) if number not in (None, "") else None,
                position=position,
                orientation=orientation,
                inversion_pivot=pivot,
            )
        )
    return frames


def _decode(dataset: pydicom.Dataset, sop_uid: str) -> tuple[np.ndarray, str]:
    """Stored values as [frames, H, W(, 3)] and the photometric interpretation they are now in.

    pydicom 3 already converts YBR_FULL(_422) to RGB while decoding (and JPEG codecs convert themselves); the
    decoder reports the resulting interpretation, so a conversion here only happens when it did not.
    """
    syntax = dataset.get("file_meta", pydicom.Dataset()).get("TransferSyntaxUID")
    if syntax is None:
        raise FrameError(f"instance {sop_uid} has no Transfer Syntax UID in its file meta; re-save it as a DICOM file")
    try:
        array, meta = get_decoder(syntax).as_array(dataset)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError, KeyError) as error:
        raise FrameError(f"cannot decode the pixels of instance {sop_uid} ({syntax.name}): {error}") from error
    photometric = str(meta.get("photometric_interpretation", dataset.get("PhotometricInterpretation", "")))
    samples = int(meta.get("samples_per_pixel", 1))
    if photometric in YBR_FULL:
        array = convert_color_space(array, photometric, "RGB")
        photometric = "RGB"
    frames = int(meta.get("number_of_frames", 1) or 1)
    if frames == 1:
        array = array[np.newaxis]
    if samples not in (1, 3) or (samples == 3 and photometric != "RGB"):
        raise FrameError(f"instance {sop_uid}: photometric interpretation {photometric} is not supported")
    return array, photometric


def _to_values(
    stored: np.ndarray, dataset: pydicom.Dataset, frame: int, photometric: str
) -> tuple[np.ndarray, float | None]:
    """Modality LUT for grey (then MONOCHROME1 inverted), 0..255 scaling for colour and palettes."""
    if photometric == "RGB":
        bits = int(dataset.get("BitsStored", 8))
        return (stored.astype(np.float32) * (255.0 / (2**bits - 1))), None
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(stored, dataset)
        return rgb.astype(np.float32) * (255.0 / np.iinfo(rgb.dtype).max), None
    if photometric not in GREY:
        raise FrameError(f"photometric interpretation {photometric!r} is not supported for grey images")
    source = frame_item(dataset, frame, "PixelValueTransformationSequence") or dataset
    values = np.asarray(apply_modality_lut(stored, source), dtype=np.float32)
    if photometric == "MONOCHROME2":
        return values, None
    pivot = _value_range_sum(dataset, source)
    return pivot - values, pivot


def _value_range_sum(dataset: pydicom.Dataset, source: pydicom.Dataset) -> float:
    """low + high of the values the stored bits can reach after the modality LUT: the MONOCHROME1 mirror."""
    bits = int(dataset.get("BitsStored", 16))
    signed = int(dataset.get("PixelRepresentation", 0)) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    ends = np.asarray(apply_modality_lut(np.array([low, high], dtype=np.int64), source), dtype=np.float64)
    return float(ends.min() + ends.max())


def _plane(dataset: pydicom.Dataset, frame: int, multi_frame: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Position and orientation of one frame; a multi-frame instance needs per-frame positions to be ordered."""
    position_item = frame_item(dataset, frame, "PlanePositionSequence")
    orientation_item = frame_item(dataset, frame, "PlaneOrientationSequence")
    position = position_item.get("ImagePositionPatient") if position_item else None
    if position is None and not multi_frame:
        position = dataset.get("ImagePositionPatient")
    orientation = (orientation_item or dataset).get("ImageOrientationPatient") or dataset.get("ImageOrientationPatient")
    return _vector(position, 3), _vector(orientation, 6)


def _vector(value: object, length: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        vector = np.asarray([float(item) for item in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    return vector if vector.shape == (length,) else None
