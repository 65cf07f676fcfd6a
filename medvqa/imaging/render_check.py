"""Whatever is imported must open: the de-identified bytes about to be stored are read back the way the viewer
and the model read them (parse, decode into frames in modality units, assemble as a series with its default
window, window one slice), and an instance that fails any step is refused at import with one line."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import pydicom

from medvqa.errors import ImportRefused, MedVQAError
from medvqa.imaging.reader import Decoded, scrub_message
from medvqa.imaging.series import read_series

# The model's image is the slice resized (longest side to the model's size) and padded to a square: a side that
# would shrink below one pixel cannot be made.
MAX_ASPECT_RATIO = 384


def check_renders(encoded: bytes, decoded: Sequence[Decoded] = ()) -> bool:
    """Refuse (ImportRefused) what the viewer or the model could not show; return whether its frames are colour.
    `decoded`: the pixels the import already decoded; reused when the stored pixel data is the same."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warnings can quote element values
        try:
            volume = read_series([pydicom.dcmread(io.BytesIO(encoded))], decoded)
            window = volume.default_window
            height, width = volume.pixels.shape[1:3]
            if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
                raise ImportRefused(f"a {width} x {height} image is too narrow to be shown or given to the model")
            middle = volume.pixels[volume.slice_count // 2]
            shown = window.lut.apply(middle) if window.lut is not None else (middle - window.low) / window.width
            if not np.isfinite(shown).all():
                raise ImportRefused("its default window does not give displayable values")
            return volume.is_colour
        except ImportRefused:
            raise
        except MedVQAError as exc:
            raise ImportRefused(f"cannot be displayed: {scrub_message(exc)}") from None
        except Exception as exc:
            raise ImportRefused(f"cannot be displayed ({type(exc).__name__}): {scrub_message(exc)}") from None
