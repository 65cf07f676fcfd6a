"""Series assembly: slice order, spacing, modality LUT, MONOCHROME1, colour, multi-frame, compressed files, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels.processing import apply_color_lut, convert_color_space
from pydicom.uid import generate_uid

from medvqa.errors import InvalidInput
from medvqa.imaging.series import PRESETS, Series, SeriesError, Window, read_series, read_series_files
from tests.dicom_factory import make_slice, per_frame_positions, write_slice


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name)  # a local file of pydicom's; never a glob, which tries to download
    assert path is not None, f"{name} is not shipped with this pydicom"
    return Path(path)


def constant(value: int, shape: tuple[int, int] = (4, 4)) -> np.ndarray:
    return np.full(shape, value, dtype=np.uint16)


def first_pixels(series: Series) -> list[float]:
    return [float(value) for value in series.pixels[:, 0, 0]]


def test_shuffled_slices_come_out_ordered_by_position_not_instance_number() -> None:
    order = [3, 0, 4, 1, 2]
    datasets = [make_slice(pixels=constant(k), position=(0, 0, 2.5 * k), instance_number=10 - k) for k in order]
    series = read_series(datasets)
    assert first_pixels(series) == [0, 1, 2, 3, 4]
    assert series.positions == (0.0, 2.5, 5.0, 7.5, 10.0)
    assert series.instance_uids == tuple(datasets[order.index(k)].SOPInstanceUID for k in range(5))
    assert series.spacing == (2.5, 0.5, 0.5)
    assert series.slice_count == 5
    assert series.pixels.shape == (5, 4, 4)
    assert series.pixels.dtype == np.float32


def test_oblique_slices_are_ordered_along_the_normal_not_along_z() -> None:
    row, column = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.6, 0.8])
    normal = np.cross(row, column)  # (0, -0.8, 0.6)
    # slice k sits 3k mm along the normal and is shifted -5k mm in-plane, so its z *falls* as k rises
    positions = {k: 3.0 * k * normal - 5.0 * k * column for k in range(4)}
    assert [positions[k][2] for k in range(4)] == sorted((positions[k][2] for k in range(4)), reverse=True)
    datasets = [
        make_slice(pixels=constant(k), position=positions[k], orientation=(*row, *column)) for k in (2, 0, 3, 1)
    ]
    series = read_series(datasets)
    assert first_pixels(series) == [0, 1, 2, 3]
    assert series.positions == pytest.approx((0.0, 3.0, 6.0, 9.0))
    assert series.spacing[0] == pytest.approx(3.0)


def test_without_positions_instance_number_orders_and_thickness_gives_spacing() -> None:
    datasets = [
        make_slice(pixels=constant(k), position=None, instance_number=k + 1, slice_thickness=3.0) for k in (1, 2, 0)
    ]
    series = read_series(datasets)
    assert first_pixels(series) == [0, 1, 2]
    assert series.positions == (0.0, 1.0, 2.0)
    assert series.spacing[0] == 3.0


def test_spacing_between_slices_wins_over_thickness_when_positions_are_missing() -> None:
    datasets = [
        make_slice(position=None, instance_number=k, slice_thickness=5.0, SpacingBetweenSlices=4.0) for k in (1, 2)
    ]
    assert read_series(datasets).spacing[0] == 4.0


def test_without_positions_or_numbers_the_input_order_is_kept() -> None:
    datasets = [make_slice(pixels=constant(k), position=None, instance_number=None) for k in (2, 0, 1)]
    series = read_series(datasets)
    assert first_pixels(series) == [2, 0, 1]
    assert series.spacing == (1.0, 0.5, 0.5)


def test_slice_spacing_is_the_median_gap_and_unknown_spacing_is_one() -> None:
    gapped = [make_slice(position=(0, 0, z), pixel_spacing=(0.7, 0.8)) for z in (0, 2, 4, 6, 100)]
    assert read_series(gapped).spacing == (2.0, 0.7, 0.8)
    lone = make_slice(position=None, pixel_spacing=None)
    assert read_series([lone]).spacing == (1.0, 1.0, 1.0)


def test_rescale_slope_and_intercept_are_applied() -> None:
    ct = make_slice(pixels=np.array([[1000, 0], [1024, 3000]], dtype=np.uint16), rescale=(1.0, -1024.0))
    assert read_series([ct]).pixels[0].tolist() == [[-24.0, -1024.0], [0.0, 1976.0]]
    scaled = make_slice(pixels=np.array([[7, 0]], dtype=np.uint16), rescale=(2.0, -10.0))
    assert read_series([scaled]).pixels[0].tolist() == [[4.0, -10.0]]


def test_modality_lut_sequence_is_applied() -> None:
    lut = pydicom.Dataset()
    lut.LUTDescriptor = [4, 0, 16]  # 4 entries, first stored value mapped is 0, 16-bit output
    lut.add_new("LUTData", "US", [10, 20, 30, 40])
    dataset = make_slice(pixels=np.array([[0, 1], [2, 3]], dtype=np.uint16), rescale=None)
    dataset.ModalityLUTSequence = pydicom.Sequence([lut])
    assert read_series([dataset]).pixels[0].tolist() == [[10.0, 20.0], [30.0, 40.0]]


def test_monochrome1_is_inverted_and_its_file_window_follows() -> None:
    stored = np.array([[0, 4095], [1000, 3000]], dtype=np.uint16)
    dataset = make_slice(pixels=stored, photometric="MONOCHROME1", bits_stored=12, window=(1000.0, 500.0))
    series = read_series([dataset])
    assert series.pixels[0].tolist() == (4095.0 - stored).tolist()
    assert series.default_window == Window(center=4095.0 - 1000.0, width=500.0, name="file")


def test_the_file_window_is_the_default_and_the_first_of_several_wins() -> None:
    assert read_series([make_slice(window=(40.0, 80.0))]).default_window == Window(40.0, 80.0, "file")
    several = make_slice(WindowCenter=[300.0, 40.0], WindowWidth=[1500.0, 400.0])
    assert read_series([several]).default_window == Window(300.0, 1500.0, "file")


def test_without_a_file_window_the_default_spans_the_robust_range() -> None:
    pixels = np.arange(100, dtype=np.uint16).reshape(10, 10)
    low, high = np.percentile(pixels.astype(np.float32), [0.5, 99.5])
    window = read_series([make_slice(pixels=pixels)]).default_window
    assert window.name == "auto"
    assert window.center == pytest.approx((low + high) / 2)
    assert window.width == pytest.approx(high - low)


def test_window_resolves_default_presets_and_custom_and_refuses_unknown_names() -> None:
    series = read_series([make_slice(window=(40.0, 80.0))])
    assert series.window() is series.default_window
    assert series.window("ct_lung") == Window(-600.0, 1500.0, "ct_lung")
    custom = Window(10.0, 20.0)
    assert series.window(custom) is custom
    expected = {"ct_brain": (40, 80), "ct_lung": (-600, 1500), "ct_mediastinum": (50, 350), "ct_bone": (400, 1800)}
    assert {name: (PRESETS[name].center, PRESETS[name].width) for name in expected} == expected
    assert (PRESETS["ct_abdomen"].center, PRESETS["ct_abdomen"].width) == (40, 400)
    with pytest.raises(ValueError, match=r"unknown window 'ct_liver'.*ct_brain"):
        series.window("ct_liver")
    with pytest.raises(ValueError, match="width must be positive"):
        Window(40.0, 0.0)


def test_rgb_is_kept_with_a_full_range_default_window() -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], dtype=np.uint8)
    series = read_series([make_slice(pixels=rgb, modality="OT")])
    assert series.pixels.shape == (1, 2, 2, 3)
    assert series.pixels[0].tolist() == rgb.astype(np.float32).tolist()
    assert (series.default_window.center, series.default_window.width) == (127.5, 255.0)


def test_synthetic_ybr_full_is_converted_to_rgb_exactly_once() -> None:
    rgb = np.array([[[200, 30, 40], [20, 180, 60]], [[10, 40, 220], [128, 128, 128]]], dtype=np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    series = read_series([make_slice(pixels=ybr, photometric="YBR_FULL", modality="OT")])
    assert np.abs(series.pixels[0] - rgb.astype(np.float32)).max() <= 2


def test_real_ybr_full_422_file_matches_the_rgb_file_of_the_same_image() -> None:
    ybr = read_series_files([pydicom_file("SC_ybr_full_422_uncompressed.dcm")])
    rgb = read_series_files([pydicom_file("SC_rgb_rle.dcm")])  # SC_rgb.dcm is not shipped locally; same image
    assert ybr.pixels.shape == rgb.pixels.shape == (1, 100, 100, 3)
    difference = np.abs(ybr.pixels - rgb.pixels)
    assert difference.max() <= 8  # chroma subsampling (4:2:2) and rounding; unconverted YBR differs by up to 255
    assert difference.mean() < 1.0


def test_palette_colour_becomes_rgb_on_0_to_255() -> None:
    path = pydicom_file("examples_palette.dcm")
    dataset = pydicom.dcmread(path)
    expected = apply_color_lut(dataset.pixel_array, dataset).astype(np.float32) / 257.0  # 16-bit LUT entries
    series = read_series_files([path])
    assert series.pixels.shape == (1, 350, 800, 3)
    assert np.allclose(series.pixels[0], expected, atol=1e-3)


def test_real_multi_frame_file_becomes_one_slice_per_frame() -> None:
    series = read_series_files([pydicom_file("SC_rgb_rle_2frame.dcm")])
    single = read_series_files([pydicom_file("SC_rgb_rle.dcm")])
    assert series.slice_count == 2
    assert series.instance_uids[0] == series.instance_uids[1]
    assert np.array_equal(series.pixels[0], single.pixels[0])
    assert np.array_equal(series.pixels[1], 255.0 - single.pixels[0])  # the file's second frame is the negative


def test_enhanced_multi_frame_uses_per_frame_positions() -> None:
    frames = np.stack([constant(k) for k in range(3)])
    dataset = make_slice(
        pixels=frames,
        position=None,
        PerFrameFunctionalGroupsSequence=per_frame_positions([(0, 0, 4.0), (0, 0, 2.0), (0, 0, 0.0)]),
    )
    series = read_series([dataset])
    assert first_pixels(series) == [2, 1, 0]
    assert series.positions == (0.0, 2.0, 4.0)
    assert series.spacing[0] == 2.0
    assert series.instance_uids == (dataset.SOPInstanceUID,) * 3


def test_multi_frame_instances_without_positions_keep_frame_order_within_instance_order() -> None:
    later = make_slice(pixels=np.stack([constant(2), constant(3)]), position=None, instance_number=2)
    earlier = make_slice(pixels=np.stack([constant(0), constant(1)]), position=None, instance_number=1)
    series = read_series([later, earlier])
    assert first_pixels(series) == [0, 1, 2, 3]
    assert series.positions == (0.0, 1.0, 2.0, 3.0)


def test_one_top_level_position_does_not_order_the_frames_of_a_multi_frame_instance() -> None:
    # all frames would share this position; it cannot order them, so frame order and indices are used
    dataset = make_slice(pixels=np.stack([constant(k) for k in range(3)]), position=(0, 0, 7.5), slice_thickness=2.0)
    series = read_series([dataset])
    assert first_pixels(series) == [0, 1, 2]
    assert series.positions == (0.0, 1.0, 2.0)
    assert series.spacing[0] == 2.0


@pytest.mark.parametrize("name", ["MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_losslessly_compressed_files_decode_to_the_uncompressed_pixels(name: str) -> None:
    reference = read_series_files([pydicom_file("MR_small.dcm")])
    series = read_series_files([pydicom_file(name)])
    assert series.pixels.shape == (1, 64, 64)
    assert np.array_equal(series.pixels, reference.pixels)
    assert series.default_window == Window(600.0, 1600.0, "file")


def test_files_on_disk_are_read_and_ordered(tmp_path: Path) -> None:
    paths = [write_slice(tmp_path / f"{z}.dcm", pixels=constant(z), position=(0, 0, z)) for z in (2, 0, 1)]
    series = read_series_files(paths)
    assert first_pixels(series) == [0, 1, 2]
    assert series.series_uid == pydicom.dcmread(paths[0]).SeriesInstanceUID


def test_instances_from_two_series_are_refused() -> None:
    other = generate_uid()
    with pytest.raises(ValueError, match=f"2 series.*{other}"):
        read_series([make_slice(), make_slice(series_uid=other)])


def test_differing_rows_and_columns_are_refused() -> None:
    with pytest.raises(ValueError, match=r"share rows, columns.*4x4.*4x5"):
        read_series([make_slice(), make_slice(pixels=np.zeros((4, 5), dtype=np.uint16), position=(0, 0, 1))])


def test_instances_without_pixels_or_without_instances_are_refused(tmp_path: Path) -> None:
    no_pixels = make_slice()
    del no_pixels.PixelData
    with pytest.raises(ValueError, match="no pixel data"):
        read_series([no_pixels])
    with pytest.raises(ValueError, match="no DICOM instances"):
        read_series([])
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(SeriesError, match=r"notes\.txt is not a readable DICOM file"):
        read_series_files([text])


def test_refusals_are_medvqa_errors_and_the_volume_is_read_only() -> None:
    assert issubclass(SeriesError, InvalidInput)
    series = read_series([make_slice()])
    with pytest.raises(ValueError, match="read-only"):
        series.pixels[0, 0, 0] = 1.0


def test_window_presets_are_offered_only_where_the_pixel_data_fits_them():
    from medvqa.services.viewer import window_choices
    from tests.dicom_factory import make_slice

    ct = read_series([make_slice(pixels=np.full((4, 4), 1000, np.uint16), rescale=(1.0, -1024.0))])
    mr = read_series([make_slice(pixels=np.full((4, 4), 900, np.uint16), modality="MR")])
    radiograph = read_series([make_slice(pixels=np.full((4, 4), 200, np.uint8), modality="OT")])
    colour = read_series([make_slice(pixels=np.zeros((4, 4, 3), np.uint8), modality="OT")])
    assert window_choices(ct) == ["default", "auto", *(name for name in PRESETS if name.startswith("ct_"))]
    assert window_choices(mr) == ["default", "auto"]  # no Hounsfield units, values past 255
    assert window_choices(radiograph) == ["default", "auto", "full_8bit"]
    assert window_choices(colour) == ["default"]
