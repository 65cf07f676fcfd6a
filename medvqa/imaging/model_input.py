"""The exact image the model sees: chosen slice(s), windowed, resized, padded to a square RGB image, and hashed.

The pipeline is a list of MONAI dictionary transforms declared in `build_pre_transforms` (MONAI Label style), so
it reads at a glance and the same steps run in the workbench, the CLI and training. Interpolation is bilinear
everywhere (align_corners=False, with MONAI's Gaussian anti-aliasing when shrinking): smooth when enlarging small
MR slices and free of aliasing when shrinking 512-pixel CT slices. MONAI and torch are imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from medvqa.errors import InvalidInput
from medvqa.imaging.series import Series, SeriesError, Window

if TYPE_CHECKING:
    from monai.transforms.compose import Compose

PIPELINE_VERSION = "medvqa.model_input/1"  # bump when a step changes, so old hashes are never matched by accident
INTERPOLATION = "bilinear"
MAX_MONTAGE_SLICES = 16


class SliceIndexError(InvalidInput, IndexError):
    """A requested slice does not exist in the series."""


@dataclass(frozen=True)
class ModelInput:
    """The model's image plus what it was made from; `preprocess_hash` identifies both."""

    image: Image.Image = field(repr=False)  # RGB, size x size
    preprocess_hash: str  # SHA-256 hex over the settings (canonical JSON) and the output pixels
    selection: dict[str, Any]  # kind, slices, instance_uids, window, size, series_uid, pipeline, interpolation


def build_pre_transforms(window: Window, size: int, colour: bool) -> Compose:
    """The preprocessing pipeline, applied to {"image": channel-last float array [H, W] or [H, W, 3]}."""
    from monai.transforms.compose import Compose
    from monai.transforms.croppad.dictionary import ResizeWithPadOrCropd
    from monai.transforms.intensity.dictionary import ScaleIntensityRanged
    from monai.transforms.spatial.dictionary import Resized
    from monai.transforms.utility.dictionary import (
        CastToTyped,
        EnsureChannelFirstd,
        EnsureTyped,
        Lambdad,
        RepeatChanneld,
    )

    keys = "image"
    return Compose(
        [
            EnsureTyped(keys, data_type="tensor", track_meta=False),
            EnsureChannelFirstd(keys, channel_dim=-1 if colour else "no_channel"),
            _intensity_step(window, keys),
            Resized(keys, spatial_size=size, size_mode="longest", mode=INTERPOLATION, anti_aliasing=True),
            ResizeWithPadOrCropd(keys, spatial_size=(size, size), mode="constant"),
            RepeatChanneld(keys, repeats=1 if colour else 3),
            ScaleIntensityRanged(keys, a_min=0.0, a_max=1.0, b_min=0.0, b_max=255.0, clip=True),
            Lambdad(keys, func=lambda image: image.round()),
            CastToTyped(keys, dtype=np.uint8),
            EnsureTyped(keys, data_type="numpy"),
        ]
    )


def _intensity_step(window: Window, keys: str) -> Any:
    """The file's VOI LUT when the window carries one, else the linear window clipped to 0..1."""
    from monai.transforms.intensity.dictionary import ScaleIntensityRanged
    from monai.transforms.utility.dictionary import Lambdad

    if window.lut is not None:
        lut = window.lut
        return Lambdad(keys, func=lambda image: image.new_tensor(lut.apply(image.cpu().numpy())))
    return ScaleIntensityRanged(keys, a_min=window.low, a_max=window.high, b_min=0.0, b_max=1.0, clip=True)


def to_model_input(
    series: Series,
    slices: int | Sequence[int] | None = None,
    window: str | Window | None = None,
    size: int = 384,
) -> ModelInput:
    """Make the model's image from one slice (an int), the key slice (None) or a montage (several ints)."""
    if size < 1:
        raise InvalidInput(f"size must be a positive number of pixels, got {size}")
    kind, chosen = _choose_slices(series, slices)
    resolved = series.window(window)
    raw = _montage([series.pixels[index] for index in chosen], fill=resolved.low) if kind == "montage" else None
    image = raw if raw is not None else series.pixels[chosen[0]]
    output = build_pre_transforms(resolved, size, series.is_colour)({"image": np.array(image, dtype=np.float32)})
    pixels = np.ascontiguousarray(np.moveaxis(np.asarray(output["image"]), 0, -1))
    selection: dict[str, Any] = {
        "kind": kind,
        "slices": list(chosen),
        "instance_uids": [series.instance_uids[index] for index in chosen],
        "window": resolved.as_dict(),
        "size": size,
        "series_uid": series.series_uid,
        "pipeline": PIPELINE_VERSION,
        "interpolation": INTERPOLATION,
    }
    return ModelInput(
        image=Image.fromarray(pixels),  # uint8 [size, size, 3] is RGB
        preprocess_hash=preprocess_hash(pixels, selection),
        selection=selection,
    )


def preprocess_hash(pixels: np.ndarray, selection: dict[str, Any]) -> str:
    """SHA-256 over the canonical JSON of the settings, the array shape and the uint8 pixels: stable across runs."""
    digest = hashlib.sha256()
    digest.update(json.dumps(selection, sort_keys=True, separators=(",", ":")).encode())
    digest.update(json.dumps(list(pixels.shape)).encode())
    digest.update(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def _choose_slices(series: Series, slices: int | Sequence[int] | None) -> tuple[str, list[int]]:
    count = series.slice_count
    if slices is None:
        return "key_slice", [count // 2]
    chosen = [int(slices)] if isinstance(slices, int | np.integer) else [int(index) for index in slices]
    if not chosen:
        raise SeriesError("no slices chosen; give a slice number, several for a montage, or None for the key slice")
    if len(chosen) > MAX_MONTAGE_SLICES:
        raise SeriesError(f"a montage holds at most {MAX_MONTAGE_SLICES} slices, {len(chosen)} were chosen")
    for index in chosen:
        if not 0 <= index < count:
            raise SliceIndexError(f"slice {index} does not exist; this series has slices 0..{count - 1}")
    return ("slice" if len(chosen) == 1 else "montage"), chosen


def montage_grid(count: int) -> tuple[int, int]:
    """(rows, columns) of the near-square grid for `count` tiles: columns = ceil(sqrt(count))."""
    columns = math.ceil(math.sqrt(count))
    return math.ceil(count / columns), columns


def _montage(tiles: Sequence[np.ndarray], fill: float) -> np.ndarray:
    """Tile slices row by row; empty cells hold `fill` (the window's low edge, so they come out black)."""
    rows, columns = montage_grid(len(tiles))
    height, width = tiles[0].shape[:2]
    canvas = np.full((rows * height, columns * width, *tiles[0].shape[2:]), fill, dtype=np.float32)
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        canvas[row * height : (row + 1) * height, column * width : (column + 1) * width] = tile
    return canvas
