"""The model's image: windowing, bilinear resize keeping the aspect ratio, padding, montage, key slice, hash."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medvqa.errors import InvalidInput
from medvqa.imaging.model_input import PIPELINE_VERSION, SliceIndexError, montage_grid, to_model_input
from medvqa.imaging.series import Series, Window, read_series, read_series_files
from tests.dicom_factory import make_slice, write_slice


def grey_series(*slices: np.ndarray) -> Series:
    """A series of stored uint16 slices (slope 1, intercept 0) stacked 1 mm apart, no file window."""
    return read_series(
        [make_slice(pixels=np.asarray(pixels, np.uint16), position=(0, 0, k)) for k, pixels in enumerate(slices)]
    )


def constant_series(*values: int, shape: tuple[int, int] = (4, 4)) -> Series:
    return grey_series(*(np.full(shape, value) for value in values))


def pixels_of(series: Series, *args: object, **kwargs: object) -> np.ndarray:
    return np.asarray(to_model_input(series, *args, **kwargs).image)  # type: ignore[arg-type]


def bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Reference resize: sample centres at half pixels, edges clamped (torch bilinear, align_corners=False)."""
    rows = np.clip((np.arange(height) + 0.5) * image.shape[0] / height - 0.5, 0, image.shape[0] - 1)
    columns = np.clip((np.arange(width) + 0.5) * image.shape[1] / width - 0.5, 0, image.shape[1] - 1)
    across = np.array([np.interp(columns, np.arange(image.shape[1]), row) for row in image])
    return np.array([np.interp(rows, np.arange(image.shape[0]), column) for column in across.T]).T


def test_the_image_is_a_square_rgb_of_the_requested_size() -> None:
    series = constant_series(0, 100)
    assert to_model_input(series, 0).image.size == (384, 384)
    small = to_model_input(series, 0, size=64).image
    assert (small.size, small.mode) == ((64, 64), "RGB")


def test_a_windowed_two_by_two_image_is_enlarged_bilinearly() -> None:
    series = grey_series(np.array([[0, 100], [200, 300]]))
    window = Window(center=150.0, width=200.0)  # 50..250 -> 0..1, clipped
    scaled = np.clip((np.array([[0.0, 100.0], [200.0, 300.0]]) - 50.0) / 200.0, 0.0, 1.0)
    expected = np.round(bilinear(scaled, 4, 4) * 255).astype(np.uint8)
    pixels = pixels_of(series, 0, window, size=4)
    assert pixels.shape == (4, 4, 3)
    for channel in range(3):
        assert pixels[..., channel].tolist() == expected.tolist()
    assert expected[0].tolist() == [0, 16, 48, 64]  # the reference itself, worked by hand for the first row


def test_colour_is_scaled_from_0_255_and_kept_per_channel() -> None:
    rgb = np.array([[[255, 0, 0], [0, 128, 0]], [[0, 0, 64], [10, 20, 30]]], dtype=np.uint8)
    series = read_series([make_slice(pixels=rgb, modality="OT")])
    assert pixels_of(series, 0, size=2).tolist() == rgb.tolist()


def test_the_aspect_ratio_is_kept_and_the_rest_padded_black() -> None:
    tall = constant_series(300, shape=(100, 50))
    pixels = pixels_of(tall, 0, Window(150.0, 300.0))  # 300 is the window's top: white
    rows, columns = np.nonzero(pixels[..., 0])
    assert (rows.min(), rows.max(), columns.min(), columns.max()) == (0, 383, 96, 287)  # 384 x 192, centred
    assert set(np.unique(pixels[rows.min() :, columns.min() : columns.max() + 1]).tolist()) == {255}
    wide = pixels_of(constant_series(300, shape=(50, 100)), 0, Window(150.0, 300.0))
    rows, columns = np.nonzero(wide[..., 0])
    assert (rows.min(), rows.max(), columns.min(), columns.max()) == (96, 287, 0, 383)


@pytest.mark.parametrize("phase", [0, 1, 2, 3])
def test_shrinking_is_anti_aliased_so_thin_lines_neither_vanish_nor_flare(phase: int) -> None:
    lines = np.zeros((64, 64), np.uint16)
    lines[:, phase::4] = 100  # one column in four is white: a quarter of the light
    pixels = pixels_of(grey_series(lines), 0, Window(50.0, 100.0), size=16)[4:12, 2:-2, 0]
    # plain bilinear sampling at 4:1 would give 0 for some phases and 128 for others
    assert np.abs(pixels.astype(int) - round(0.25 * 255)).max() <= 12


def test_the_key_slice_is_the_middle_slice() -> None:
    series = constant_series(0, 50, 100, 150, 200)
    key = to_model_input(series, window=Window(100.0, 200.0), size=8)
    assert key.selection["kind"] == "key_slice"
    assert key.selection["slices"] == [2]
    assert np.asarray(key.image)[4, 4].tolist() == [128, 128, 128]  # 100 is mid-window: round(127.5) = 128
    assert to_model_input(constant_series(0, 1, 2, 3)).selection["slices"] == [2]


def test_a_montage_tiles_slices_row_by_row_with_one_window() -> None:
    series = constant_series(0, 100, 200, 300)
    montage = to_model_input(series, [0, 1, 2, 3], Window(150.0, 300.0), size=64)  # 0..300 -> 0, 85, 170, 255
    pixels = np.asarray(montage.image)[..., 0]
    assert [pixels[16, 16], pixels[16, 48], pixels[48, 16], pixels[48, 48]] == [0, 85, 170, 255]
    assert montage.selection["kind"] == "montage"
    assert montage.selection["slices"] == [0, 1, 2, 3]


def test_empty_montage_cells_are_black_whatever_the_window() -> None:
    series = constant_series(100, 200, 300)
    pixels = np.asarray(to_model_input(series, [0, 1, 2], Window(0.0, 2000.0), size=64).image)[..., 0]
    assert pixels[48, 48] == 0  # the fourth cell of the 2 x 2 grid; stored 0 would be mid-grey in this window
    assert pixels[48, 16] == round((300 + 1000) / 2000 * 255)


def test_montage_grids_are_near_square() -> None:
    grids = {count: montage_grid(count) for count in (1, 2, 3, 4, 5, 7, 10, 16)}
    assert grids == {1: (1, 1), 2: (1, 2), 3: (2, 2), 4: (2, 2), 5: (2, 3), 7: (3, 3), 10: (3, 4), 16: (4, 4)}


def test_selection_records_what_the_model_saw() -> None:
    series = constant_series(0, 100)
    result = to_model_input(series, 1, "ct_lung", size=32)
    assert result.selection == {
        "kind": "slice",
        "slices": [1],
        "instance_uids": [series.instance_uids[1]],
        "window": {"center": -600.0, "width": 1500.0, "name": "ct_lung"},
        "size": 32,
        "series_uid": series.series_uid,
        "pipeline": PIPELINE_VERSION,
        "interpolation": "bilinear",
    }


def test_the_hash_covers_settings_and_pixels_and_is_repeatable() -> None:
    series = constant_series(0, 100, 200)
    result = to_model_input(series, 1, size=16)
    pixels = np.asarray(result.image)
    digest = hashlib.sha256()
    digest.update(json.dumps(result.selection, sort_keys=True, separators=(",", ":")).encode())
    digest.update(json.dumps(list(pixels.shape)).encode())
    digest.update(pixels.tobytes())
    assert result.preprocess_hash == digest.hexdigest()
    assert to_model_input(series, 1, size=16).preprocess_hash == result.preprocess_hash


def test_the_hash_changes_with_slice_window_size_and_a_single_pixel() -> None:
    image = np.array([[0, 100], [200, 300]])
    series = grey_series(image, image)  # two identical slices: only the recorded slice number differs
    touched = image.copy()
    touched[0, 0] = 1
    hashes = {
        "base": to_model_input(series, 0, size=8).preprocess_hash,
        "slice": to_model_input(series, 1, size=8).preprocess_hash,
        "window": to_model_input(series, 0, Window(150.0, 301.0), size=8).preprocess_hash,
        "size": to_model_input(series, 0, size=9).preprocess_hash,
        "pixel": to_model_input(grey_series(touched, image), 0, series.default_window, size=8).preprocess_hash,
    }
    assert len(set(hashes.values())) == len(hashes)


def test_the_hash_is_the_same_in_another_process(tmp_path: Path) -> None:
    paths = [
        write_slice(tmp_path / f"{k}.dcm", pixels=np.full((6, 5), 40 * k, np.uint16), position=(0, 0, k))
        for k in range(3)
    ]
    here = to_model_input(read_series_files(paths), [0, 2], "ct_brain", size=24).preprocess_hash
    script = (
        "import sys; from pathlib import Path\n"
        "from medvqa.imaging.series import read_series_files\n"
        "from medvqa.imaging.model_input import to_model_input\n"
        "series = read_series_files([Path(p) for p in sys.argv[1:]])\n"
        "print(to_model_input(series, [0, 2], 'ct_brain', size=24).preprocess_hash)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, paths)], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == here


def test_out_of_range_and_oversized_selections_are_refused() -> None:
    series = constant_series(0, 1, 2)
    with pytest.raises(IndexError, match=r"slice 3 does not exist; this series has slices 0\.\.2"):
        to_model_input(series, 3)
    with pytest.raises(SliceIndexError, match="slice -1 does not exist"):
        to_model_input(series, [0, -1])
    with pytest.raises(ValueError, match="at most 16 slices, 17 were chosen"):
        to_model_input(series, [0] * 17)
    with pytest.raises(InvalidInput, match="size must be a positive"):
        to_model_input(series, 0, size=0)


def _voi_lut_slice(photometric: str = "MONOCHROME2"):
    """A 16x16 image of values 0..255 whose file carries a square-root VOI LUT and no window."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    pixels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    table = np.round(np.sqrt(np.arange(256) / 255) * 255).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = table.tolist()
    ds = make_slice(pixels=pixels, window=None, photometric=photometric, bits_stored=8, rescale=None)
    ds.BitsAllocated = 16
    ds.VOILUTSequence = Sequence([item])
    return ds, pixels, table


def test_a_file_voi_lut_is_applied_exactly():
    ds, pixels, table = _voi_lut_slice()
    series = read_series([ds])
    assert series.default_window.lut is not None and series.default_window.name == "file"
    result = to_model_input(series, 0, size=16)
    expected = table[pixels]  # the LUT's 8-bit output is the display value itself
    np.testing.assert_array_equal(np.asarray(result.image)[..., 0], expected)
    assert "voi_lut_sha256" in result.selection["window"]
    linear = to_model_input(series, 0, window="full_8bit", size=16)
    assert linear.preprocess_hash != result.preprocess_hash


def test_a_voi_lut_on_monochrome1_still_shows_dense_as_bright():
    ds, pixels, table = _voi_lut_slice("MONOCHROME1")
    result = to_model_input(read_series([ds]), 0, size=16)
    np.testing.assert_array_equal(np.asarray(result.image)[..., 0], 255 - table[pixels])
