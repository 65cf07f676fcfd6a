"""Burned-in text in the pixels, found with a real OCR engine (Debian's tesseract through pytesseract).

Each checked frame is windowed to 8 bit (min to max: burned-in text is usually drawn at the brightest or darkest
value), upscaled so that its long side reaches `TARGET_SIDE` (text in medical images is small: 6-12 pixels high on a
512 matrix), and read in up to five passes, run as tesseract processes at once: as stored; inverted (tesseract
reads dark on light best; annotations are usually white on black); a mask of its brightest values; and the white
and black top-hats of the frame, binarised (a grey opening or closing with a square a little larger than a text
stroke removes the text and keeps the anatomy, so the difference keeps thin bright or dark strokes and drops
the textured background that hides small text from the other passes).
A word counts when one pass reads it with a confidence of at least `MIN_CONFIDENCE` and at least `MIN_CHARACTERS`
letters or digits, or when at least `AGREEING_PASSES` passes read overlapping words with at least
`WEAK_CONFIDENCE` and `WEAK_CHARACTERS`: real text is read by several passes at one place, noise in textured
anatomy rarely is. Names, dates and identifiers count, while the single letters of orientation marks (R, L, A) do
not; the figures behind these numbers are in README's Benchmarks (bench/ocr_bench.py).

Only boxes and confidences leave this module: the recognised text is dropped here, never stored, logged or shown
(it may be a name). Results are cached by pixel hash, so importing the same pixels again costs nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

DETECTOR_VERSION = "medvqa.burned_in/3"
TARGET_SIDE = 2400  # upscale (at most MAX_UPSCALE times) until the long side reaches this many pixels
MAX_UPSCALE = 4
BRIGHT_THRESHOLD = 200  # of 255, after upscaling: the third pass keeps only what is this bright
MAX_BRIGHT_SHARE = 0.12  # ... and runs only when that is sparse (text alone: 1-5% of an image; noise: 15% and more)
MIN_CONFIDENCE = 60.0  # one pass alone: this confident ...
MIN_CHARACTERS = 4  # ... about this many letters or digits
WEAK_CONFIDENCE = 40.0  # or several passes at one place: each this confident ...
WEAK_CHARACTERS = 3  # ... about this many letters or digits ...
AGREEING_PASSES = 2  # ... in this many passes
AGREEMENT_OVERLAP = 0.3  # share of the smaller box two words must share to be at one place
TOPHAT_FRACTION = 64  # the top-hat square's side: the frame's short side / this (odd, at least 5 pixels)
MAX_FRAMES = 3  # first, middle and last frame of a multi-frame instance (cine text is static)
TIMEOUT_S = 120
BOX_MARGIN = 2  # pixels added around each word when boxes are mapped back to the image
_ALNUM = re.compile(r"[A-Za-z0-9]")
log = logging.getLogger(__name__)

# Tesseract is built with OpenMP: with two processes per image, one thread each is what two cores take.
os.environ.setdefault("OMP_THREAD_LIMIT", "1")


@dataclass(frozen=True)
class TextBox:
    """One word's box in the stored image (pixels, frame index from 0) and tesseract's confidence (0-100)."""

    frame: int
    left: int
    top: int
    width: int
    height: int
    confidence: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TextDetection:
    """What the detector found: word boxes (never the words), or why it could not look."""

    boxes: tuple[TextBox, ...] = ()
    checked: bool = True
    error: str = ""
    engine: str = ""
    seconds: float = 0.0
    frames_checked: tuple[int, ...] = field(default=())

    @property
    def found_text(self) -> bool:
        return bool(self.boxes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "detector": DETECTOR_VERSION,
            "engine": self.engine,
            "checked": self.checked,
            "error": self.error,
            "frames_checked": list(self.frames_checked),
            "boxes": [box.as_dict() for box in self.boxes],
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextDetection:
        return cls(
            boxes=tuple(TextBox(**box) for box in data.get("boxes", [])),
            checked=bool(data.get("checked", False)),
            error=str(data.get("error", "")),
            engine=str(data.get("engine", "")),
            seconds=float(data.get("seconds", 0.0)),
            frames_checked=tuple(int(f) for f in data.get("frames_checked", [])),
        )


@cache
def engine_version() -> str:
    """'tesseract X.Y.Z', or '' when the engine is missing."""
    try:
        import pytesseract  # type: ignore[import-untyped]

        return f"tesseract {pytesseract.get_tesseract_version()}"
    except Exception:  # missing binary, broken install: the caller holds the instance instead
        return ""


class TextDetector:
    """Finds burned-in text; caches results by pixel hash under `cache_dir` (None: no cache)."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.cache_dir = cache_dir

    def detect(self, pixels: np.ndarray, samples_per_pixel: int, pixel_hash: str | None = None) -> TextDetection:
        cached = self._cached(pixel_hash)
        if cached is not None:
            return cached
        result = detect_text(pixels, samples_per_pixel)
        if result.checked:
            self._store(pixel_hash, result)
        return result

    def _path(self, pixel_hash: str | None) -> Path | None:
        if self.cache_dir is None or not pixel_hash or not re.fullmatch(r"[0-9a-f]{64}", pixel_hash):
            return None
        return self.cache_dir / f"{pixel_hash}.json"

    def _cached(self, pixel_hash: str | None) -> TextDetection | None:
        path = self._path(pixel_hash)
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if data.get("detector") != DETECTOR_VERSION or data.get("engine") != engine_version():
            return None
        return TextDetection.from_dict(data)

    def _store(self, pixel_hash: str | None, result: TextDetection) -> None:
        path = self._path(pixel_hash)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(result.as_dict(), sort_keys=True))
            os.replace(temporary, path)
        except OSError as exc:  # a cache that cannot be written only costs time
            log.warning("OCR cache not written: %s", type(exc).__name__)


def detect_text(pixels: np.ndarray, samples_per_pixel: int = 1) -> TextDetection:
    """Word boxes of text tesseract reads in the frames of `pixels` (as pydicom decodes them: [H, W], [H, W, 3],
    [F, H, W] or [F, H, W, 3])."""
    started = time.monotonic()
    engine = engine_version()
    if not engine:
        return TextDetection(checked=False, error="the OCR engine (tesseract) is not installed")
    frames = _frames(np.asarray(pixels), samples_per_pixel)
    chosen = sorted({0, len(frames) // 2, len(frames) - 1})[:MAX_FRAMES]
    boxes: list[TextBox] = []
    try:
        for index in chosen:
            boxes.extend(_frame_boxes(frames[index], index))
    except Exception as exc:  # a tesseract failure or timeout: the caller holds the instance for a person
        return TextDetection(checked=False, error=f"OCR failed ({type(exc).__name__})", engine=engine)
    return TextDetection(tuple(boxes), True, "", engine, time.monotonic() - started, tuple(chosen))


def to_grey8(frame: np.ndarray) -> np.ndarray:
    """One frame as uint8 grey, min to max (colour through its luminance)."""
    values = np.asarray(frame, dtype=np.float64)
    if values.ndim == 3:
        values = values[..., :3] @ np.array([0.299, 0.587, 0.114])
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _frames(pixels: np.ndarray, samples_per_pixel: int) -> list[np.ndarray]:
    colour = samples_per_pixel > 1
    if pixels.ndim == (3 if colour else 2):
        return [pixels]
    return [pixels[index] for index in range(pixels.shape[0])]


def prepared_images(frame: np.ndarray) -> tuple[float, list[Image.Image]]:
    """The scale factor and the images tesseract reads: as stored, inverted, the brightest values alone (black on
    white), and the white and black top-hats, binarised (text black on white)."""
    grey8 = to_grey8(frame)
    grey = _upscaled(grey8)
    scale = grey.width / grey8.shape[1]
    images = [grey, ImageOps.invert(grey)]
    bright = np.asarray(grey) >= BRIGHT_THRESHOLD
    if bright.mean() <= MAX_BRIGHT_SHARE:  # a bright picture, not sparse annotations: the mask would be noise
        images.append(Image.fromarray(np.where(bright, 0, 255).astype(np.uint8), mode="L"))
    side = max(5, (min(grey8.shape) // TOPHAT_FRACTION) | 1)
    for white in (True, False):
        images.append(_upscaled(_binarised(_top_hat(grey8, side, white))))
    return scale, images


def _upscaled(grey8: np.ndarray) -> Image.Image:
    image = Image.fromarray(grey8, mode="L")
    scale = max(1.0, min(float(MAX_UPSCALE), TARGET_SIDE / max(image.size)))
    if scale > 1.0:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    return image


def _square_filter(values: np.ndarray, side: int, reduce: Any) -> np.ndarray:
    """A grey erosion (reduce=np.min) or dilation (np.max) with a side x side square, one axis at a time."""
    pad = side // 2
    for axis in (0, 1):
        widths = [(0, 0), (0, 0)]
        widths[axis] = (pad, pad)
        windows = np.lib.stride_tricks.sliding_window_view(np.pad(values, widths, mode="edge"), side, axis=axis)
        values = reduce(windows, axis=-1)
    return np.asarray(values)


def _top_hat(grey8: np.ndarray, side: int, white: bool) -> np.ndarray:
    """What an opening (white) or closing (black) with a side x side square removes: strokes thinner than it."""
    values = grey8.astype(np.int16)
    if white:
        smoothed = _square_filter(_square_filter(values, side, np.min), side, np.max)
        difference = values - smoothed
    else:
        smoothed = _square_filter(_square_filter(values, side, np.max), side, np.min)
        difference = smoothed - values
    return np.asarray(np.clip(difference, 0, 255), dtype=np.uint8)


def _binarised(top_hat: np.ndarray) -> np.ndarray:
    """Strong top-hat responses as black on white (half the 99.5th percentile, at least 40 of 255)."""
    threshold = max(40, int(np.percentile(top_hat, 99.5) * 0.5))
    return np.where(top_hat >= threshold, 0, 255).astype(np.uint8)


Word = tuple[int, int, int, int, float, int]  # left, top, width, height, confidence, letters or digits


def _frame_boxes(frame: np.ndarray, index: int) -> list[TextBox]:
    scale, images = prepared_images(frame)
    with ThreadPoolExecutor(max_workers=len(images)) as pool:
        passes = list(pool.map(scored_words, images))
    height, width = frame.shape[:2]
    boxes = []
    for left, top, box_width, box_height, confidence, _ in counted_words(passes):
        x0 = max(0, int(left / scale) - BOX_MARGIN)
        y0 = max(0, int(top / scale) - BOX_MARGIN)
        x1 = min(width, int(np.ceil((left + box_width) / scale)) + BOX_MARGIN)
        y1 = min(height, int(np.ceil((top + box_height) / scale)) + BOX_MARGIN)
        if x1 > x0 and y1 > y0:
            boxes.append(TextBox(index, x0, y0, x1 - x0, y1 - y0, round(confidence, 1)))
    return _unique(boxes)


def counted_words(
    passes: list[list[Word]],
    strong: tuple[float, int] = (MIN_CONFIDENCE, MIN_CHARACTERS),
    weak: tuple[float, int] = (WEAK_CONFIDENCE, WEAK_CHARACTERS),
    agreeing: int = AGREEING_PASSES,
) -> list[Word]:
    """The words that count as text: read strongly by one pass, or weakly by `agreeing` passes at one place."""
    counted = [w for words in passes for w in words if w[4] >= strong[0] and w[5] >= strong[1]]
    candidates = [
        (number, w) for number, words in enumerate(passes) for w in words if w[4] >= weak[0] and w[5] >= weak[1]
    ]
    for number, word in candidates:
        seen_by = {other for other, w in candidates if other != number and _word_overlap(word, w) > AGREEMENT_OVERLAP}
        if len(seen_by) + 1 >= agreeing:
            counted.append(word)
    return counted


def _word_overlap(a: Word, b: Word) -> float:
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    return (width * height) / max(1, min(a[2] * a[3], b[2] * b[3]))


def scored_words(image: Image.Image) -> list[Word]:
    """Every word tesseract reads: box, confidence and how many letters or digits it has (not what they are)."""
    import pytesseract

    data = pytesseract.image_to_data(
        image, lang="eng", config="--psm 11", output_type=pytesseract.Output.DICT, timeout=TIMEOUT_S
    )
    return [
        (int(left), int(top), int(width), int(height), float(confidence), len(_ALNUM.findall(str(text))))
        for text, confidence, left, top, width, height in zip(
            data["text"], data["conf"], data["left"], data["top"], data["width"], data["height"], strict=True
        )
        if str(text).strip()
    ]


def _unique(boxes: list[TextBox]) -> list[TextBox]:
    """Both passes often find the same word: keep one box where two overlap by more than half."""
    kept: list[TextBox] = []
    for box in sorted(boxes, key=lambda b: -b.confidence):
        if not any(_overlap(box, other) > 0.5 for other in kept):
            kept.append(box)
    return sorted(kept, key=lambda b: (b.frame, b.top, b.left))


def _overlap(a: TextBox, b: TextBox) -> float:
    if a.frame != b.frame:
        return 0.0
    width = min(a.left + a.width, b.left + b.width) - max(a.left, b.left)
    height = min(a.top + a.height, b.top + b.height) - max(a.top, b.top)
    if width <= 0 or height <= 0:
        return 0.0
    return (width * height) / min(a.width * a.height, b.width * b.height)


def black_out(pixels: np.ndarray, boxes: list[TextBox], samples_per_pixel: int) -> np.ndarray:
    """A copy of the stored pixel values with every box filled with the frame's minimum value."""
    cleaned = np.array(pixels, copy=True)
    colour = samples_per_pixel > 1
    multi = cleaned.ndim == (4 if colour else 3)
    for box in boxes:
        frames = range(cleaned.shape[0]) if multi else [None]
        for frame in frames:  # text found on one frame of a cine loop is blacked out on every frame
            target = cleaned[frame] if frame is not None else cleaned
            fill = target.min(axis=(0, 1)) if colour else target.min()
            target[box.top : box.top + box.height, box.left : box.left + box.width] = fill
    return cleaned
