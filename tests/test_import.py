"""`medvqa import`: real DICOM in, de-identified studies out; bad files refused one line each, the rest goes on."""

from __future__ import annotations

import json
import logging
import struct
import zipfile
from pathlib import Path

import hypothesis
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file
from sqlalchemy import func, select, text

from medvqa.cli import main
from medvqa.config import load_settings
from medvqa.db import AuditEvent, Base, Instance, Study
from medvqa.errors import AccessDenied, ImportRefused, ImportSkipped
from medvqa.services.studies import import_paths
from tests import factories
from tests.hostile_inputs import deflate_bomb
from tests.phi_factory import encode, make_phi_slice, phi_strings, write_phi_series


@pytest.fixture
def settings(tmp_path):
    return load_settings(home=tmp_path / "home")


def stored_files(settings):
    return sorted(p for p in settings.store_dir.rglob("*.dcm"))


def count(db, model):
    with db.read_session() as session:
        return session.scalar(select(func.count()).select_from(model))


def database_text(db) -> str:
    with db.engine.connect() as connection:
        return repr([connection.execute(text(f"SELECT * FROM {t.name}")).all() for t in Base.metadata.sorted_tables])


def test_fake_phi_is_nowhere_after_import(db, settings, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    write_phi_series(tmp_path / "in" / "ct", 3)
    write_phi_series(tmp_path / "in" / "us", 1, modality="US", first_index=10)
    report = import_paths(db, factories.OPERATOR, [tmp_path / "in"], settings)
    assert report.count("imported") == 4 and report.count("refused") == 0
    assert [o.held for o in report.outcomes] == [False, False, False, True]  # US without BurnedInAnnotation
    captured = capsys.readouterr()
    haystacks = {
        "database": database_text(db),
        "logs": caplog.text,
        "console": captured.out + captured.err,
        **{f"store:{p.name}": p.read_bytes().decode("latin-1") for p in stored_files(settings)},
    }
    assert len(stored_files(settings)) == 4
    for where, haystack in haystacks.items():
        for value in phi_strings():
            assert value not in haystack, f"{value!r} found in {where}"


def test_reimport_stores_once_and_audits_each_import(db, settings, tmp_path):
    paths = write_phi_series(tmp_path / "in", 3)
    first = import_paths(db, factories.OPERATOR, paths, settings)
    files = stored_files(settings)
    second = import_paths(db, factories.OPERATOR, [*paths, paths[0]], settings)
    assert first.count("imported") == 3 and second.count("duplicate") == 4
    assert stored_files(settings) == files and count(db, Instance) == 3 and count(db, Study) == 1
    with db.read_session() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "study:study:import")).all()
    assert [e.details["instances_new"] for e in events] == [3, 0]
    assert {e.object_id for e in events} == {str(first.study_ids[0])}


def test_slices_keep_their_position_and_series_metadata(db, settings, tmp_path):
    import_paths(db, factories.OPERATOR, write_phi_series(tmp_path / "in", 3), settings)
    with db.read_session() as session:
        positions = sorted(session.scalars(select(Instance.slice_position)))
        study = session.scalars(select(Study)).one()
    assert positions == [0.0, 2.5, 5.0]
    assert (study.modality, study.body_part, study.study_date) == ("CT", "CHEST", None)
    assert study.patient_pseudonym.startswith("ANON-")


REAL_FILES = [
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "JPGExtended.dcm",
    "image_dfl.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "SC_rgb_rle_2frame.dcm",
]


def test_compressed_transfer_syntaxes_import(db, settings):
    paths = [Path(get_testdata_file(name)) for name in REAL_FILES]
    report = import_paths(db, factories.OPERATOR, paths, settings)
    problems = [(o.source, o.reason) for o in report.outcomes if o.status not in ("imported", "duplicate")]
    assert problems == []
    assert report.count("imported") >= 6


def test_same_image_in_any_transfer_syntax_has_one_pixel_hash(settings):
    variants = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]
    records = [prepare(Path(get_testdata_file(name)).read_bytes(), settings) for name in variants]
    assert len({r.pixel_hash for r in records}) == 1
    assert len({r.storage_path for r in records}) == 4  # different files, same pixels


def prepare(data: bytes, settings):
    from medvqa.imaging.importer import prepare_instance
    from medvqa.imaging.store import ContentStore
    from medvqa.services.studies import build_deidentifier, import_limits

    return prepare_instance(
        data, build_deidentifier(settings), ContentStore(settings.store_dir), import_limits(settings)
    )


def _without_meta(ds) -> bytes:
    data = encode(ds)
    meta_length = struct.unpack("<I", data[140:144])[0]
    return data[:132] + data[144 + meta_length :]


def _with(**changes):
    ds = make_phi_slice()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return encode(ds)


def _nested(levels: int) -> bytes:
    body = b""
    for _ in range(levels):  # (0008,1115) SQ of undefined length holding one item holding the next level
        body = (
            b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff"
            + body
            + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        )
    return encode(make_phi_slice()) + body


BAD_INPUTS = [
    ("not DICOM at all", lambda: b"Patient report, nothing to see here\n" * 40, "not a DICOM file"),
    ("empty file", lambda: b"", "empty file"),
    ("preamble without DICM", lambda: b"\x00" * 128 + b"NOPE" + b"\x00" * 64, "no 'DICM' marker"),
    ("missing file meta", lambda: _without_meta(make_phi_slice()), "file meta"),
    ("truncated pixel data", lambda: encode(make_phi_slice())[:-100], "truncated pixel data"),
    ("no pixel data (SR)", lambda: Path(get_testdata_file("reportsi.dcm")).read_bytes(), "no pixel data (SR"),
    ("declared gigabytes of pixels", lambda: _with(Rows=65535, Columns=65535, NumberOfFrames=90), "exceed the limit"),
    (
        "declared gigabytes in an element",
        lambda: encode(make_phi_slice()) + b"\x09\x00\x10\x10OB\x00\x00\xf0\xff\xff\xff" + b"\x00" * 16,
        "declares 4294967280 bytes",
    ),
    ("deeply nested sequences", lambda: _nested(5000), "nested too deeply"),
    ("nested deeper than the profile walks", lambda: _nested(40), "nested deeper"),
    (
        "UID with path characters",
        lambda: _with(SOPInstanceUID="1.2.3/../../etc/passwd"),
        "SOPInstanceUID is not a valid",
    ),
    ("UID over 64 characters", lambda: _with(StudyInstanceUID="1." + "2" * 70), "StudyInstanceUID is not a valid"),
    ("missing UID", lambda: _with(SeriesInstanceUID=""), "SeriesInstanceUID is missing"),
]


@pytest.mark.parametrize(("label", "build", "reason"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused_with_one_clear_line(settings, label, build, reason):
    with pytest.raises(ImportRefused) as refused:
        prepare(build(), settings)
    message = str(refused.value)
    assert reason in message and "\n" not in message
    assert stored_files(settings) == []


def test_deflate_bomb_is_refused_before_inflating(settings):
    data = deflate_bomb(64 << 20)  # 64 MiB of zeros deflated to ~64 KiB
    small = load_settings(home=settings.home, import_max_file_bytes=8 << 20)
    assert len(data) < 1 << 20
    with pytest.raises(ImportRefused, match="deflate"):
        prepare(data, small)


def test_invalid_character_set_and_dates_import_cleanly_or_refuse_cleanly(settings):
    ds = make_phi_slice()
    ds.SpecificCharacterSet = "ISO_IR 999"
    ds.StudyDate = "2019-13-45"
    try:
        record = prepare(encode(ds), settings)
    except ImportRefused as refused:
        assert "\n" not in str(refused)
    else:
        assert record.study_date is None
        data = stored_files(settings)[0].read_bytes()
        assert not any(value.encode() in data for value in phi_strings())


def test_a_bad_file_does_not_stop_the_rest(db, settings, tmp_path):
    folder = tmp_path / "in"
    write_phi_series(folder, 2)
    for index, (_label, build, _) in enumerate(BAD_INPUTS[:6]):
        (folder / f"bad{index}.dcm").write_bytes(build())
    report = import_paths(db, factories.OPERATOR, [folder], settings)
    assert report.count("imported") == 2 and report.count("refused") == 6
    assert all(o.reason for o in report.outcomes if o.status == "refused")
    assert count(db, Instance) == 2 and len(stored_files(settings)) == 2


def test_limits_refuse_before_reading(db, settings, tmp_path):
    paths = write_phi_series(tmp_path / "in", 3)
    tiny = load_settings(home=settings.home, import_max_file_bytes=1000)
    report = import_paths(db, factories.OPERATOR, paths[:1], tiny)
    assert "MEDVQA_IMPORT_MAX_FILE_BYTES" in report.outcomes[0].reason
    few = load_settings(home=settings.home, import_max_instances=2)
    with pytest.raises(ImportRefused, match="MEDVQA_IMPORT_MAX_INSTANCES"):
        import_paths(db, factories.OPERATOR, paths, few)
    small = load_settings(home=settings.home, import_max_pixels=100)
    assert "MEDVQA_IMPORT_MAX_PIXELS" in import_paths(db, factories.OPERATOR, paths[:1], small).outcomes[0].reason
    assert count(db, Instance) == 0


def test_zip_files_and_zip_bombs(db, settings, tmp_path):
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for index in range(2):
            zf.writestr(f"series/slice{index}.dcm", encode(make_phi_slice(index)))
        zf.writestr("notes.txt", "not an image")
        zf.writestr("bomb.dcm", b"\x00" * (20 << 20))
    report = import_paths(db, factories.OPERATOR, [archive], settings)
    outcome = {Path(o.source.split("!")[1]).name: o for o in report.outcomes}
    assert outcome["slice0.dcm"].status == outcome["slice1.dcm"].status == "imported"
    assert "not a DICOM file" in outcome["notes.txt"].reason
    assert "zip bomb" in outcome["bomb.dcm"].reason


def test_dicomdir_imports_the_files_it_lists(db, settings):
    dicomdir = Path(get_testdata_file("DICOMDIR", read=False) or "")
    if not dicomdir.name:  # pragma: no cover - pydicom always ships it
        pytest.skip("pydicom's DICOMDIR test set is missing")
    report = import_paths(db, factories.OPERATOR, [dicomdir], settings)
    assert report.count("skipped") == 0
    assert report.count("imported") >= 3 and count(db, Study) >= 2


def test_png_and_jpeg_become_held_secondary_captures(db, settings, tmp_path):
    png = tmp_path / "teaching.png"
    Image.fromarray(np.arange(64 * 48, dtype=np.uint8).reshape(48, 64)).save(png)
    jpeg = tmp_path / "teaching.jpg"
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(jpeg)
    report = import_paths(db, factories.OPERATOR, [png, jpeg], settings)
    assert [(o.status, o.held) for o in report.outcomes] == [("imported", True), ("imported", True)]
    with db.read_session() as session:
        rows = session.execute(select(Instance.rows, Instance.columns).order_by(Instance.id)).all()
    assert [tuple(r) for r in rows] == [(48, 64), (20, 30)]


def test_only_permitted_roles_import(db, settings, tmp_path):
    auditor = factories.make_user(db, "auditor")
    with pytest.raises(AccessDenied):
        import_paths(db, auditor, write_phi_series(tmp_path / "in", 1), settings)
    assert stored_files(settings) == []


def test_cli_import_exit_codes_and_json(db, cli_env, tmp_path):
    good = write_phi_series(tmp_path / "in", 2)
    result = CliRunner().invoke(main, ["import", *map(str, good), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["imported"] == 2
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"")
    result = CliRunner().invoke(main, ["import", str(bad), str(good[0])])
    assert result.exit_code == 1
    assert f"refused: {bad}: empty file" in result.stdout
    assert "0 instance(s)" in result.stdout and "1 already stored" in result.stdout
    missing = CliRunner().invoke(main, ["import", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "no such file or folder" in missing.stderr
    listing = CliRunner().invoke(main, ["studies", "list", "--json"])
    assert [s["instances"] for s in json.loads(listing.stdout)["studies"]] == [2]


VALID = encode(make_phi_slice())
HEADER_END = len(VALID) - len(make_phi_slice().PixelData)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    edits=st.lists(st.tuples(st.integers(0, HEADER_END - 1), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, len(VALID))),
    insert=st.one_of(st.none(), st.tuples(st.integers(132, HEADER_END), st.binary(min_size=1, max_size=12))),
)
def test_mutated_headers_import_or_refuse_cleanly(mutation_settings, edits, cut, insert):
    data = bytearray(VALID)
    for position, value in edits:
        data[position] = value
    if insert is not None:
        data[insert[0] : insert[0]] = insert[1]
    if cut is not None:
        del data[cut:]
    try:
        record = prepare(bytes(data), mutation_settings)
    except (ImportRefused, ImportSkipped) as refused:
        assert str(refused) and "\n" not in str(refused)
    else:
        assert len(record.pixel_hash) == 64 and record.rows * record.columns > 0


@pytest.fixture(scope="module")
def mutation_settings(tmp_path_factory):
    return load_settings(home=tmp_path_factory.mktemp("mutation"))


@pytest.mark.parametrize(
    "syntax",
    [
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.5",  # RLE Lossless
    ],
)
def test_every_compressed_syntax_named_by_the_design_has_a_decoder(syntax):
    from pydicom.pixels.decoders.base import get_decoder

    assert get_decoder(syntax).is_available, f"no pixel decoder installed for {syntax}"


def test_an_undecodable_syntax_is_refused_by_name(settings):
    from pydicom.encaps import encapsulate

    ds = make_phi_slice()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: no decoder here
    ds.PixelData = encapsulate([ds.PixelData])
    with pytest.raises(ImportRefused, match=r"transfer syntax MPEG2 .*cannot be decoded here"):
        prepare(encode(ds), settings)
