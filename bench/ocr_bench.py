"""How well the burned-in text detector (medvqa/imaging/burned_in.py) works: recall on images with known burned-in
text, false holds on images without, and time per image, in one table.

Backgrounds: pydicom's own test images (CT, MR, US-like RGB) and VQA-RAD images cut to their central 60% (the
MedPix marks and uploader lines sit at the edges; a crop that still shows an arrow label or letter counts against
the detector, so the false-hold figure is an upper bound). Text: names, dates and identifiers like those a scanner
or an uploader burns in, drawn with DejaVu Sans (PIL's default font where DejaVu is missing) at several pixel
sizes, in corners and the middle, white on dark and dark on light. Each image is drawn at its own size and
given to the detector as stored pixel values, as at import.

    .venv/bin/python bench/ocr_bench.py [--images N] [--data ../shared/data/vqa-rad]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medvqa.imaging import burned_in

TEXTS = ["SMITH^JOHN", "DOE JANE 1957", "03/12/2019", "MRN 00482913", "Uploader: R. Roe", "ACC 7731-22", "14:32:07"]
SIZES = (8, 10, 12, 16, 24)
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "middle")
PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "SC_rgb_small_odd.dcm")  # local files (no download)
MIN_SIDE = 256  # backgrounds smaller than a 256 matrix are enlarged to it, as a viewer would show them
# (strong: confidence, letters or digits), (weak: confidence, letters or digits), passes that must agree on a weak word
Rule = tuple[tuple[float, int], tuple[float, int], int]
RULES: list[Rule] = [
    ((confidence, characters), weak, agreeing)
    for confidence, characters in ((60, 3), (60, 4), (70, 4), (60, 5))
    for weak, agreeing in (((30, 3), 2), ((40, 3), 2), ((50, 3), 2), ((30, 3), 3), ((101, 9), 9))
]


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size)


def backgrounds(data: Path, count: int, skip: int = 0) -> list[tuple[str, np.ndarray]]:
    """(name, grey uint8 image) without text: pydicom test images, then VQA-RAD central crops."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    found = []
    for name in PYDICOM_FILES:
        path = get_testdata_file(name)
        if path is None:
            continue
        pixels = np.asarray(dcmread(path).pixel_array)
        frame = pixels[0] if pixels.ndim == 4 or (pixels.ndim == 3 and pixels.shape[-1] != 3) else pixels
        found.append((name, _at_least(burned_in.to_grey8(frame))))
    images = sorted((data / "images").glob("*.jpg"))
    random.Random(0).shuffle(images)
    for path in images[skip : skip + max(0, count - len(found))]:
        grey = np.asarray(Image.open(path).convert("L"))
        height, width = grey.shape
        crop = grey[int(height * 0.2) : int(height * 0.8), int(width * 0.2) : int(width * 0.8)]
        found.append((path.name, _at_least(crop)))
    return found


def _at_least(image: np.ndarray) -> np.ndarray:
    scale = MIN_SIDE / min(image.shape)
    if scale <= 1:
        return image
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def with_text(image: np.ndarray, text: str, size: int, position: str, light_on_dark: bool) -> np.ndarray:
    """The image with `text` burned in at `size` pixels (scaled up with the image when the image is small)."""
    canvas = Image.fromarray(image)
    scale = max(1, round(min(canvas.size) / 512)) if size >= 10 else 1
    face = font(size * scale)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=face)
    width, height = right - left, bottom - top
    margin = 4
    x = {"left": margin, "right": canvas.width - width - margin}.get(
        position.split("-")[-1], (canvas.width - width) // 2
    )
    y = {"top": margin, "bottom": canvas.height - height - margin}.get(position.split("-")[0], canvas.height // 2)
    colour = 255 if light_on_dark else 0
    if not light_on_dark:  # dark text needs a light field, as on a report page or a light label
        draw.rectangle((x - 2, y - 2, x + width + 2, y + height + 2), fill=235)
    draw.text((x - left, y - top), text, fill=colour, font=face)
    return np.asarray(canvas)


def timed(pixels: np.ndarray) -> tuple[list[list[burned_in.Word]], float]:
    """Every word each pass reads (box, confidence, letters-or-digits count), and the seconds a detection takes."""
    started = time.perf_counter()
    burned_in.detect_text(pixels)
    seconds = time.perf_counter() - started
    _, images = burned_in.prepared_images(pixels)
    return [burned_in.scored_words(image) for image in images], seconds


def held(passes: list[list[burned_in.Word]], rule: Rule) -> bool:
    return bool(burned_in.counted_words(passes, *rule))


def describe(rule: Rule) -> str:
    (strong_conf, strong_chars), (weak_conf, weak_chars), agreeing = rule
    if agreeing > 5:
        return f"| {strong_conf:g} | {strong_chars} | - | - |"
    return f"| {strong_conf:g} | {strong_chars} | {weak_conf:g} / {weak_chars} | {agreeing} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40, help="backgrounds (pydicom's first, then VQA-RAD crops)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/vqa-rad")
    parser.add_argument(
        "--skip",
        type=int,
        default=0,
        help="VQA-RAD backgrounds to pass over (to measure on ones a rule was not chosen on)",
    )
    args = parser.parse_args()
    if not burned_in.engine_version():
        raise SystemExit("tesseract is not installed: apt-get install tesseract-ocr tesseract-ocr-eng")
    rng = random.Random(1)
    images = backgrounds(args.data, args.images, args.skip)
    clean = [timed(image) for _, image in images]
    marked: list[tuple[int, bool, list[tuple[float, int]]]] = []  # (size, light on dark, words)
    times = [seconds for _, seconds in clean]
    for index, (_, image) in enumerate(images):
        for size in SIZES:
            light = (index + size) % 2 == 0
            words, seconds = timed(with_text(image, rng.choice(TEXTS), size, rng.choice(POSITIONS), light))
            marked.append((size, light, words))
            times.append(seconds)
    rule: Rule = (
        (burned_in.MIN_CONFIDENCE, burned_in.MIN_CHARACTERS),
        (burned_in.WEAK_CONFIDENCE, burned_in.WEAK_CHARACTERS),
        burned_in.AGREEING_PASSES,
    )
    print(f"burned-in text detector {burned_in.DETECTOR_VERSION}, {burned_in.engine_version()}")
    print(
        f"rule: one pass with confidence >= {rule[0][0]:g} and >= {rule[0][1]} letters or digits, or "
        f"{rule[2]} passes at one place with >= {rule[1][0]:g} and >= {rule[1][1]}; upscaled to "
        f"{burned_in.TARGET_SIDE} px (at most x{burned_in.MAX_UPSCALE}), read as stored, inverted, as its "
        f"brightest values and as its white and black top-hats; {len(images)} backgrounds from number "
        f"{args.skip}\n"
    )
    print("| images | what | held | rate |")
    print("|---|---|---:|---:|")
    for size in SIZES:
        hits = [held(w, rule) for s, _, w in marked if s == size]
        print(f"| {len(hits)} | text {size} px high | {sum(hits)} | {sum(hits) / len(hits):.1%} recall |")
    for light, name in ((True, "light on dark"), (False, "dark on light")):
        hits = [held(w, rule) for _, lit, w in marked if lit == light]
        print(f"| {len(hits)} | text {name} | {sum(hits)} | {sum(hits) / len(hits):.1%} recall |")
    hits = [held(w, rule) for _, _, w in marked]
    print(f"| {len(hits)} | all text | {sum(hits)} | {sum(hits) / len(hits):.1%} recall |")
    false = [held(w, rule) for w, _ in clean]
    print(f"| {len(false)} | no text | {sum(false)} | {sum(false) / len(false):.1%} false holds |")
    print(
        f"\ntime per image: median {statistics.median(times):.2f} s, p90 {np.percentile(times, 90):.2f} s, "
        f"over {len(times)} images (up to five tesseract processes per image, at once)\n"
    )
    print("| one pass: confidence >= | letters or digits >= | or weak words >= | in passes | recall | false holds |")
    print("|---:|---:|---:|---:|---:|---:|")
    for candidate in [rule, *RULES]:
        recall = sum(held(w, candidate) for _, _, w in marked) / len(marked)
        holds = sum(held(w, candidate) for w, _ in clean) / len(clean)
        mark = " (used)" if candidate == rule else ""
        print(f"{describe(candidate)} {recall:.1%}{mark} | {holds:.1%} |")


if __name__ == "__main__":
    main()
