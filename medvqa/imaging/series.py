"""One DICOM series as one ordered volume: the pixels every later step (window/level, model input, hashing) sees.

Slices are ordered along the slice normal, the modality LUT is applied, MONOCHROME1 is inverted so bright means
dense, and colour is RGB on a 0..255 scale, whatever the transfer syntax or photometric interpretation of the files.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medvqa.errors import InvalidInput
from medvqa.imaging.frames import Frame, finite_numbers, frame_item, lenient_number, lenient_value, read_frames
from medvqa.imaging.reader import Decoded, scrub_message


class SeriesError(InvalidInput, ValueError):
    """The instances cannot form one volume (mixed series, missing pixels, differing sizes)."""


@dataclass(frozen=True)
class VoiLut:
    """A file's VOI LUT (0028,3010) as a table over modality values: `table[v - first]`, in 0..1."""

    first: float
    table: tuple[float, ...]

    def apply(self, values: np.ndarray) -> np.ndarray:
        index = np.clip(np.rint(np.asarray(values) - self.first), 0, len(self.table) - 1).astype(np.int64)
        return np.asarray(self.table, dtype=np.float32)[index]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(np.asarray(self.table, dtype=np.float32).tobytes()).hexdigest()


@dataclass(frozen=True)
class Window:
    """A display window (level/width) in modality units, e.g. Hounsfield units for CT; a file's VOI LUT, when it
    has one instead, is carried in `lut` (center/width then span the LUT's input range)."""

    center: float
    width: float
    name: str = "custom"  # "file", a preset name, "auto" or "custom"
    lut: VoiLut | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise SeriesError(f"window width must be positive, got {self.width}")

    @property
    def low(self) -> float:
        return self.center - self.width / 2

    @property
    def high(self) -> float:
        return self.center + self.width / 2

    def as_dict(self) -> dict[str, float | str]:
        described: dict[str, float | str] = {"center": float(self.center), "width": float(self.width)}
        described["name"] = self.name
        if self.lut is not None:
            described["voi_lut_sha256"] = self.lut.sha256
        return described


PRESETS: dict[str, Window] = {
    window.name: window
    for window in (
        Window(40, 80, "ct_brain"),
        Window(-600, 1500, "ct_lung"),
        Window(50, 350, "ct_mediastinum"),
        Window(400, 1800, "ct_bone"),
        Window(40, 400, "ct_abdomen"),
        Window(80, 200, "ct_stroke"),
        Window(127.5, 255, "full_8bit"),
    )
}

COLOUR_WINDOW = Window(127.5, 255, "auto")  # RGB is kept on 0..255: this window maps it to 0..1 unchanged


@dataclass(frozen=True, eq=False)
class Series:
    """The de-identified instances of one series as a volume; `pixels` is read-only."""

    series_uid: str
    modality: str
    pixels: np.ndarray = field(repr=False)  # float32 [N, H, W] (grey) or [N, H, W, 3] (RGB 0..255)
    spacing: tuple[float, float, float]  # (between slices, rows, columns) in mm; 1.0 where unknown
    positions: tuple[float, ...]  # along the slice normal in mm, or the slice index when unknown
    instance_uids: tuple[str, ...]  # SOPInstanceUID per slice (repeated for the frames of one instance)
    default_window: Window

    @property
    def slice_count(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def is_colour(self) -> bool:
        return self.pixels.ndim == 4

    def window(self, name_or_window: str | Window | None = None) -> Window:
        """Resolve a window: None is the default one, a string names a preset (or "default"/"file"/"auto")."""
        if name_or_window is None or name_or_window in ("default", self.default_window.name):
            return self.default_window
        if isinstance(name_or_window, Window):
            return name_or_window
        if name_or_window in PRESETS:
            return PRESETS[name_or_window]
        if name_or_window == "auto":
            return auto_window(self.pixels)
        choices = ", ".join(["default", "auto", *PRESETS])
        raise SeriesError(f"unknown window {name_or_window!r}; choose one of: {choices}")


def read_series_files(paths: Sequence[Path]) -> Series:
    """Read the DICOM files of one series and assemble them (see `read_series`)."""
    datasets = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except FileNotFoundError as error:
            raise SeriesError(f"stored file {path.name} is missing; run `medvqa store check`") from error
        except (InvalidDicomError, OSError) as error:
            raise SeriesError(
                f"stored file {path.name} is not a readable DICOM file: {scrub_message(error)}"
            ) from error
        except Exception as error:  # a corrupt file can make the parser raise anything
            raise SeriesError(
                f"stored file {path.name} cannot be read ({type(error).__name__}): {scrub_message(error)}"
            ) from error
    return read_series(datasets)


def read_series(datasets: Sequence[pydicom.Dataset], decoded: Sequence[Decoded] = ()) -> Series:
    """Assemble the instances of ONE series into a volume ordered along the slice normal (`decoded`: pixels
    already decoded from some of them, see `read_frames`)."""
    if not datasets:
        raise SeriesError("no DICOM instances given; a series needs at least one image")
    series_uid = _single_series_uid(datasets)
    frames = [frame for index, dataset in enumerate(datasets) for frame in read_frames(dataset, index, decoded)]
    _check_same_shape(frames)
    ordered, positions, known = _order_frames(frames)
    pixels = np.stack([frame.pixels for frame in ordered]).astype(np.float32, copy=False)
    pixels.setflags(write=False)
    first = datasets[0]
    return Series(
        series_uid=series_uid,
        modality=str(lenient_value(first, "Modality") or "OT"),
        pixels=pixels,
        spacing=(_slice_spacing(positions, known, first), *_pixel_spacing(first)),
        positions=positions,
        instance_uids=tuple(frame.sop_uid for frame in ordered),
        default_window=_default_window(ordered[0], first, pixels),
    )


def auto_window(pixels: np.ndarray) -> Window:
    """A window over the 0.5th..99.5th percentile of the values: robust to a few extreme pixels (metal, air)."""
    low, high = (float(value) for value in np.percentile(pixels, [0.5, 99.5]))
    return Window(center=(low + high) / 2, width=max(high - low, 1.0), name="auto")


def _single_series_uid(datasets: Sequence[pydicom.Dataset]) -> str:
    uids = {str(dataset.get("SeriesInstanceUID", "")) for dataset in datasets}
    if "" in uids:
        raise SeriesError("an instance has no SeriesInstanceUID; cannot tell which series it belongs to")
    if len(uids) > 1:
        raise SeriesError(f"instances from {len(uids)} series were given ({', '.join(sorted(uids))}); pass one series")
    return uids.pop()


def _check_same_shape(frames: Sequence[Frame]) -> None:
    shapes = {frame.pixels.shape for frame in frames}
    if len(shapes) > 1:
        described = "; ".join(
            f"{frame.sop_uid or f'instance {frame.input_index}'}: {'x'.join(map(str, frame.pixels.shape))}"
            for frame in {frame.pixels.shape: frame for frame in frames}.values()
        )
        raise SeriesError(
            f"the images of one series must share rows, columns and samples per pixel, found {described}; "
            "split the series or resample it"
        )


def _order_frames(frames: Sequence[Frame]) -> tuple[list[Frame], tuple[float, ...], bool]:
    """Order by position along the normal; else by InstanceNumber; else keep the input order.

    Returns the ordered frames, their positions (indices when unknown), and whether positions are real.
    """
    normal = _slice_normal(frames)
    if normal is not None and all(frame.position is not None for frame in frames):
        along = {id(frame): float(np.dot(frame.position, normal)) for frame in frames}  # type: ignore[arg-type]
        ordered = sorted(frames, key=lambda frame: (along[id(frame)], *_fallback_key(frame)))
        return ordered, tuple(along[id(frame)] for frame in ordered), True
    ordered = sorted(frames, key=_fallback_key)
    return ordered, tuple(float(index) for index in range(len(ordered))), False


def _fallback_key(frame: Frame) -> tuple[int, int, int]:
    instance_number = frame.instance_number if frame.instance_number is not None else 0
    return (instance_number, frame.input_index, frame.frame_index)


def _slice_normal(frames: Sequence[Frame]) -> np.ndarray | None:
    """Cross product of the row and column direction cosines of the first oriented frame."""
    for frame in frames:
        if frame.orientation is not None:
            normal = np.cross(frame.orientation[:3], frame.orientation[3:])
            norm = float(np.linalg.norm(normal))
            return normal / norm if norm > 0 else None
    return None


def _slice_spacing(positions: tuple[float, ...], known: bool, dataset: pydicom.Dataset) -> float:
    """Median gap between sorted positions; else SpacingBetweenSlices or SliceThickness; else 1.0."""
    if known and len(positions) > 1:
        gaps = np.diff(np.asarray(positions))
        gaps = gaps[gaps > 1e-6]
        if gaps.size:
            return float(np.median(gaps))
    measures = frame_item(dataset, 0, "PixelMeasuresSequence") or dataset
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        for source in (measures, dataset):
            value = lenient_number(source, keyword)
            if value is not None and value > 0:
                return value
    return 1.0


def _pixel_spacing(dataset: pydicom.Dataset) -> tuple[float, float]:
    """PixelSpacing (row, column) in mm; (1, 1) where it is absent, junk or not positive."""
    measures = frame_item(dataset, 0, "PixelMeasuresSequence") or dataset
    for source in (measures, dataset):
        spacing = finite_numbers(lenient_value(source, "PixelSpacing"))
        if spacing is not None and len(spacing) == 2 and min(spacing) > 0:
            return (spacing[0], spacing[1])
    return (1.0, 1.0)


def _default_window(first: Frame, dataset: pydicom.Dataset, pixels: np.ndarray) -> Window:
    """The file's first window (mapped through a MONOCHROME1 inversion), else an automatic one."""
    if pixels.ndim == 4:
        return COLOUR_WINDOW
    source = frame_item(dataset, first.frame_index, "FrameVOILUTSequence") or dataset
    center, width = lenient_number(source, "WindowCenter"), lenient_number(source, "WindowWidth")
    if center is not None and width is not None and width > 0:
        if first.inversion_pivot is not None:
            center = first.inversion_pivot - center
        return Window(center=center, width=width, name="file")
    lut = _lenient_voi_lut(source, first.inversion_pivot)
    if lut is not None:
        return Window(center=lut.first + len(lut.table) / 2, width=float(len(lut.table)), name="file", lut=lut)
    return auto_window(pixels)


def _lenient_voi_lut(source: pydicom.Dataset, inversion_pivot: float | None) -> VoiLut | None:
    """The file's VOI LUT, or None when it is malformed (the automatic window is used instead)."""
    try:
        lut = _voi_lut(source, inversion_pivot)
    except Exception:
        return None
    if lut is None or not lut.table or not all(math.isfinite(value) for value in lut.table):
        return None
    return lut


def _voi_lut(source: pydicom.Dataset, inversion_pivot: float | None) -> VoiLut | None:
    """The first VOI LUT of the file as a table, read through pydicom's own apply_voi_lut over its input range,
    mirrored like the pixels when the image was MONOCHROME1."""
    from pydicom.pixels.processing import apply_voi_lut

    sequence = source.get("VOILUTSequence")
    if not sequence or "LUTDescriptor" not in sequence[0]:
        return None
    entries, first, bits = (int(v) for v in sequence[0].LUTDescriptor)
    entries = entries or 65536
    inputs = np.arange(first, first + entries, dtype=np.int32)
    table = np.asarray(apply_voi_lut(inputs, source, index=0, prefer_lut=True), dtype=np.float64) / (2**bits - 1)
    if inversion_pivot is not None:  # pixels were mirrored v -> pivot - v, and MONOCHROME1 shows high as dark
        return VoiLut(first=inversion_pivot - (first + entries - 1), table=tuple(1.0 - table[::-1]))
    return VoiLut(first=float(first), table=tuple(table))
