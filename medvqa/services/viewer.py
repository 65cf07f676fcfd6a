"""What the viewer shows: a slice through a window as 8-bit pixels, thumbnails, and de-identified tags.

Display is numpy only (no MONAI, no torch), so scrolling and windowing stay fast; the model's image is made by
`services.images.model_input` and shown beside the answer. The tags come from the stored, already
de-identified file and are further limited to a list that carries no identity.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pydicom
from sqlalchemy import select

from compliance.policy import Action
from medvqa.config import Settings
from medvqa.db import Instance
from medvqa.db.engine import Database
from medvqa.errors import InvalidInput, NotFound
from medvqa.imaging.frames import lenient_value
from medvqa.imaging.reader import one_line
from medvqa.imaging.series import PRESETS, Series, Window
from medvqa.imaging.store import ContentStore
from medvqa.services.access import authorize
from medvqa.services.audit import Actor

# Tags shown in the metadata panel: acquisition and geometry only, plus the de-identification record.
DISPLAY_TAGS = (
    "Modality",
    "BodyPartExamined",
    "SeriesNumber",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PhotometricInterpretation",
    "BitsStored",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "BurnedInAnnotation",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
)


def window_choices(volume: Series) -> list[str]:
    """Window names for the picker: the series' own default and 'auto' (its value range), then the presets that
    fit its pixel data: the CT presets (Hounsfield units) for CT only, the 8-bit one for values in 0..255.
    A colour series keeps its own window: its RGB values are shown as they are."""
    if volume.is_colour:
        return ["default"]
    hounsfield = [name for name in PRESETS if name.startswith("ct_")] if volume.modality.upper() == "CT" else []
    low, high = float(volume.pixels.min()), float(volume.pixels.max())
    eight_bit = ["full_8bit"] if low >= 0 and high <= 255 else []
    return ["default", "auto", *hounsfield, *eight_bit]


def render_slice(volume: Series, index: int, window: str | Window | None = None) -> np.ndarray:
    """Slice `index` through `window` as uint8 pixels ([H, W] grey or [H, W, 3] colour)."""
    if not 0 <= index < volume.slice_count:
        raise InvalidInput(f"slice {index} does not exist; this series has slices 0..{volume.slice_count - 1}")
    resolved = volume.window(window)
    pixels = volume.pixels[index]
    if resolved.lut is not None:
        scaled = resolved.lut.apply(pixels)
    else:
        scaled = (pixels - np.float32(resolved.low)) / np.float32(resolved.width)
    out: np.ndarray = (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return out


def thumbnails(volume: Series, count: int = 8, size: int = 96) -> list[tuple[int, np.ndarray]]:
    """Up to `count` evenly spaced slices, each shrunk by striding to at most `size` pixels a side."""
    total = volume.slice_count
    shown = min(count, total)
    indices = sorted({round(i * (total - 1) / max(shown - 1, 1)) for i in range(shown)})
    step = max(1, max(volume.pixels.shape[1:3]) // size)
    return [(index, render_slice(volume, index)[::step, ::step]) for index in indices]


def instance_metadata(db: Database, actor: Actor, settings: Settings, volume: Series, index: int) -> dict[str, str]:
    """The listed tags of the (de-identified) stored instance behind slice `index`."""
    authorize(db, actor, Action.STUDY_VIEW, "series", volume.series_uid)
    if not 0 <= index < volume.slice_count:
        raise InvalidInput(f"slice {index} does not exist; this series has slices 0..{volume.slice_count - 1}")
    uid = volume.instance_uids[index]
    with db.read_session() as session:
        path = session.scalar(select(Instance.storage_path).where(Instance.sop_instance_uid == uid))
    if path is None:
        raise NotFound(f"instance {uid} is not stored")
    try:
        dataset = pydicom.dcmread(ContentStore(settings.store_dir).path(path), stop_before_pixels=True)
    except Exception as exc:
        raise InvalidInput(f"the stored file of instance {uid} cannot be read ({type(exc).__name__})") from None
    return {keyword: _text(lenient_value(dataset, keyword)) for keyword in DISPLAY_TAGS if keyword in dataset}


def _text(value: Any) -> str:
    """A tag's value as one line of text; a value that cannot be shown becomes a placeholder."""
    try:
        if value is None:
            return "(unreadable)"
        if isinstance(value, pydicom.multival.MultiValue | list | tuple):
            return one_line("\\".join(str(item) for item in value))
        return one_line(str(value))
    except Exception:
        return "(unreadable)"
