"""Whatever is imported opens: junk in tags that only describe an image never stops a series from opening, what
cannot be rendered is refused at import with one line, and the viewer's own errors are one line too."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from medvqa.config import load_settings
from medvqa.db import Instance, Series
from medvqa.errors import ImportRefused, InvalidInput
from medvqa.imaging.frames import FrameError
from medvqa.imaging.render_check import check_renders
from medvqa.imaging.series import SeriesError, read_series, read_series_files
from medvqa.imaging.store import ContentStore
from medvqa.services.images import load_series
from medvqa.services.studies import import_paths
from medvqa.services.viewer import instance_metadata, render_slice
from tests import factories
from tests import hostile_inputs as hostile
from tests.dicom_factory import make_slice
from tests.phi_factory import encode, make_phi_slice


def parsed(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def junk(keyword: str, vr: str, value: bytes, **slice_options) -> pydicom.Dataset:
    """A slice whose `keyword` holds raw junk bytes, read back as a stored file would be."""
    ds = make_slice(**slice_options)
    hostile.set_raw(ds, keyword, vr, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return parsed(buffer.getvalue())


@pytest.mark.parametrize(
    ("keyword", "vr", "value"),
    [
        ("InstanceNumber", "IS", b"abc"),
        ("InstanceNumber", "IS", b"99999999999999999999999"),
        ("SliceThickness", "DS", b"thick"),
        ("SliceThickness", "DS", b"-inf"),
        ("SpacingBetweenSlices", "DS", b"nan"),
        ("WindowCenter", "DS", b"xx\\40"),
        ("WindowWidth", "DS", b"0"),
        ("WindowWidth", "DS", b"1e999"),
        ("PixelSpacing", "DS", b"0.5"),
        ("PixelSpacing", "DS", b"wide\\tall"),
        ("ImagePositionPatient", "DS", b"0\\0\\nan"),
        ("ImageOrientationPatient", "DS", b"1\\0\\0\\0\\one\\0"),
        ("Modality", "CS", b"Phisurname free text that is far too long"),
    ],
)
def test_junk_in_a_descriptive_tag_never_stops_a_series_from_opening(keyword, vr, value):
    datasets = [junk(keyword, vr, value, position=(0, 0, 2.0 * k), window=(40, 400)) for k in range(3)]
    series = read_series(datasets)
    assert series.slice_count == 3 and np.isfinite(series.pixels).all()
    assert series.default_window.width > 0 and all(s > 0 for s in series.spacing)
    assert render_slice(series, 1).dtype == np.uint8


def test_junk_tags_leave_sensible_defaults():
    ds = junk("WindowCenter", "DS", b"level", pixels=np.arange(16, dtype=np.uint16).reshape(4, 4), window=(40, 400))
    hostile.set_raw(ds, "PixelSpacing", "DS", b"1e999\\0.5")
    hostile.set_raw(ds, "SliceThickness", "DS", b"thin")
    hostile.set_raw(ds, "InstanceNumber", "IS", b"first")
    series = read_series([ds])
    assert series.default_window.name == "auto"  # the file's window was junk
    assert series.spacing == (1.0, 1.0, 1.0)


def test_what_gives_pixels_their_meaning_must_be_usable():
    with pytest.raises(FrameError, match="RescaleSlope is not a number"):
        read_series([junk("RescaleSlope", "DS", b"steep")])
    with pytest.raises(FrameError, match="palette colour image without a usable colour lookup table"):
        read_series([parsed(hostile.palette_without_lut())])
    with pytest.raises(FrameError, match="cannot decode the pixels") as bits:
        read_series([junk("BitsStored", "US", b"\x00")])
    assert "\n" not in str(bits.value)
    floats = make_slice()
    del floats.PixelData
    floats.BitsAllocated = 32
    floats.FloatPixelData = np.array([[0.0, np.nan], [1.0, 2.0]], dtype=np.float32).tobytes()
    floats.Rows = floats.Columns = 2
    with pytest.raises(FrameError, match="not all finite"):
        read_series([floats])


def test_a_frame_count_that_disagrees_with_the_data_is_a_one_line_error():
    ds = make_slice(pixels=np.zeros((2, 4, 4), dtype=np.uint16))
    ds.NumberOfFrames = 2
    hostile.set_raw(ds, "NumberOfFrames", "IS", b"many")
    with pytest.raises(FrameError) as error:
        read_series([ds])
    assert "\n" not in str(error.value)


def test_differing_sizes_in_one_series_are_one_clear_line():
    with pytest.raises(SeriesError, match="must share rows, columns"):
        read_series([make_slice(), make_slice(pixels=np.zeros((8, 8), dtype=np.uint16))])


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (hostile.palette_without_lut, "palette colour"),
        (hostile.junk_rescale, "RescaleSlope is not a number"),
        (hostile.encapsulated_frame_count_mismatch, ""),
    ],
)
def test_the_render_check_refuses_what_cannot_be_shown(build, reason):
    with pytest.raises(ImportRefused) as refused:
        check_renders(build())
    assert reason in str(refused.value) and "\n" not in str(refused.value)


def test_the_render_check_passes_what_the_viewer_opens():
    assert check_renders(hostile.junk_numbers()) is False
    rgb = make_slice(pixels=np.zeros((4, 4, 3), dtype=np.uint8))
    assert check_renders(encode(rgb)) is True
    with pytest.raises(ImportRefused, match="too narrow"):
        check_renders(encode(make_slice(pixels=np.zeros((1, 1000), dtype=np.uint16))))


def test_imported_instances_with_junk_numbers_open_and_show_their_tags(db, tmp_path):
    settings = load_settings(home=tmp_path / "home")
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "junk.dcm").write_bytes(hostile.junk_numbers(0))
    for index in range(1, 3):
        (folder / f"s{index}.dcm").write_bytes(hostile.valid_dicom(index))
    report = import_paths(db, factories.OPERATOR, [folder], settings)
    assert [o.status for o in report.outcomes] == ["imported"] * 3
    reviewer = factories.make_user(db, "reviewer")
    with db.read_session() as session:
        series_id = session.scalars(select(Series.id)).one()
    volume = load_series(db, reviewer, series_id, settings)
    assert volume.slice_count == 3
    for index in range(3):
        tags = instance_metadata(db, reviewer, settings, volume, index)
        assert all("\n" not in value for value in tags.values())


def test_legacy_unrenderable_files_in_the_store_give_one_line_not_a_traceback(db, tmp_path):
    """A file imported before the render check (palette without its table) makes opening the series one
    line; a stored file that went missing names only the file."""
    settings = load_settings(home=tmp_path / "home")
    (tmp_path / "a.dcm").write_bytes(encode(make_phi_slice(0)))
    import_paths(db, factories.OPERATOR, [tmp_path / "a.dcm"], settings)
    store = ContentStore(settings.store_dir)
    with db.read_session() as session:
        path = session.scalars(select(Instance.storage_path)).one()
        series_id = session.scalars(select(Series.id)).one()
    stored = parsed(store.path(path).read_bytes())
    stored.PhotometricInterpretation = "PALETTE COLOR"
    stored.save_as(store.path(path), enforce_file_format=True)
    reviewer = factories.make_user(db, "reviewer")
    with pytest.raises(InvalidInput) as error:
        load_series(db, reviewer, series_id, settings)
    assert "\n" not in str(error.value) and str(settings.store_dir) not in str(error.value)
    store.path(path).unlink()
    with pytest.raises(SeriesError, match="is missing") as missing:
        read_series_files([store.path(path)])
    assert str(settings.store_dir) not in str(missing.value)


@pytest.mark.parametrize("name", ["MR_small_jp2klossless.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small.dcm"])
def test_the_render_check_reuses_the_pixels_the_import_decoded(name, tmp_path, monkeypatch):
    """Decoding is the costly step for compressed files: the import decodes once, and the render check reads
    the same pixels back from the de-identified bytes without decoding them again (pixel hash unchanged). When
    de-identification had to clean the compressed stream (comment or application segments, wrapper boxes), it
    decodes the cleaned stream once to prove the values are unchanged, and the render check reuses that."""
    from pathlib import Path

    from pydicom.data import get_testdata_file
    from pydicom.pixels.decoders.base import Decoder

    from tests.test_import import prepare

    calls = []
    real = Decoder.as_array

    def counting(self, *args, **kwargs):
        calls.append(self.UID)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Decoder, "as_array", counting)
    data = Path(get_testdata_file(name)).read_bytes()
    settings = load_settings(home=tmp_path / "home")
    record = prepare(data, settings)
    stored = pydicom.dcmread(settings.store_dir / record.storage_path)
    cleaned = stored.PixelData != pydicom.dcmread(io.BytesIO(data)).PixelData
    assert len(calls) == (2 if cleaned and stored.file_meta.TransferSyntaxUID.is_compressed else 1)
    from medvqa.imaging.importer import hash_pixels

    assert record.pixel_hash == hash_pixels(np.asarray(pydicom.dcmread(io.BytesIO(data)).pixel_array))
