"""Issue 15, part 1: planted markers in every place a DICOM file can hide text never reach the store, the database,
the logs or the command output; what is kept is only what the product reads, each value valid for its VR."""

from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.datadict import DicomDictionary, dictionary_has_tag, dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian
from sqlalchemy import select, text

from compliance.deid import (
    ALLOWED,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    Deidentifier,
    DeidSettings,
    Rule,
    _profile,
    action_for,
)
from medvqa.cli import main
from medvqa.config import load_settings
from medvqa.db import AuditEvent, Base, Instance
from medvqa.errors import ImportRefused
from tests.phi_factory import TEXT_VR_VALUES, Markers, encode, make_marked_file, make_phi_slice, text_element
from tests.test_import import prepare

KEY = bytes(range(32))


def everything_in(db) -> str:
    """Every column of every row of every table."""
    with db.engine.connect() as connection:
        rows = [connection.execute(text(f"SELECT * FROM {t.name}")).all() for t in Base.metadata.sorted_tables]
    return repr(rows)


def test_markers_in_every_place_survive_nowhere(db, cli_env, tmp_path, caplog):
    """Preamble, file meta, every text VR and byte VR at four depths, overlays, curves, embedded documents,
    icons, retained numbers and codes holding text, alternative calendars, private and unknown tags: imported
    through `medvqa import` into a real database, not one marker is found anywhere afterwards."""
    caplog.set_level(logging.DEBUG)
    planted: list[str] = []
    folder = tmp_path / "in"
    folder.mkdir()
    for seed in range(3):
        data, markers = make_marked_file(seed)
        (folder / f"marked{seed}.dcm").write_bytes(data)
        planted += markers
    assert len(planted) > 300 and len(set(planted)) == len(planted)
    runner = CliRunner()
    imported = runner.invoke(main, ["import", str(folder), "--json"])
    assert imported.exit_code == 0, imported.output
    summary = json.loads(imported.stdout)
    assert summary["imported"] == 3
    assert all(f["values_corrected"] >= 7 for f in summary["files"])  # counted, never shown
    listing = runner.invoke(main, ["studies", "list"])
    listing_json = runner.invoke(main, ["studies", "list", "--json"])
    assert {s["modality"] for s in json.loads(listing_json.stdout)["studies"]} == {"OT"}
    store = load_settings().store_dir
    stored = sorted(store.rglob("*.dcm"))
    assert len(stored) == 3
    haystacks = {
        "database": everything_in(db),
        "logs": caplog.text,
        "output": imported.output + listing.output + listing_json.output,
        **{f"store:{path.name}": path.read_bytes().decode("latin-1") for path in stored},
    }
    for where, haystack in haystacks.items():
        found = [marker for marker in planted if marker in haystack]
        assert found == [], f"{len(found)} marker(s) in {where}, e.g. {found[:3]}"
    for path in stored:
        data = path.read_bytes()
        assert data[:128] == b"\x00" * 128
        meta = dcmread(path).file_meta
        assert {e.keyword for e in meta} == {
            "FileMetaInformationGroupLength",
            "FileMetaInformationVersion",
            "MediaStorageSOPClassUID",
            "MediaStorageSOPInstanceUID",
            "TransferSyntaxUID",
            "ImplementationClassUID",
            "ImplementationVersionName",
        }
        assert (meta.ImplementationClassUID, meta.ImplementationVersionName) == (
            IMPLEMENTATION_CLASS_UID,
            IMPLEMENTATION_VERSION_NAME,
        )
    with db.read_session() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "study:study:import")).first()
        reports = session.scalars(select(Instance.deid_report)).all()
    assert event is not None and event.details["values_corrected"] >= 7
    assert all(r["corrected"]["Modality"] == 1 and r["corrected"]["InstanceNumber"] == 1 for r in reports)


def test_only_allowlisted_attributes_remain_at_any_depth():
    ds = dcmread_bytes(make_marked_file(7)[0])
    Deidentifier(DeidSettings(KEY)).deidentify(ds)
    written = {"PatientID", "PatientName", "PatientIdentityRemoved", "DeidentificationMethod"}
    written |= {"DeidentificationMethodCodeSequence", "LongitudinalTemporalInformationModified"}

    def check(dataset, rules):
        for element in dataset:
            assert not element.tag.is_private
            if rules is ALLOWED and element.keyword in written:
                continue
            assert element.keyword in rules, element.keyword
            if element.VR == "SQ":
                for item in element.value:
                    check(item, rules[element.keyword].items)

    check(ds, ALLOWED)


def dcmread_bytes(data: bytes) -> Dataset:
    import io

    return dcmread(io.BytesIO(data))


E1_REMOVED = sorted(
    tag
    for tag, action in _profile()[0].items()
    if action == "X" and dictionary_has_tag(tag) and dictionary_VR(tag) in TEXT_VR_VALUES and tag >> 16 != 0x0002
)


def test_table_e1_removals_hold_even_when_someone_allowlists_them():
    """Table E.1-1 is the floor: an attribute it says to remove is removed even when it is on the allowlist."""
    from pydicom.datadict import keyword_for_tag

    assert len(E1_REMOVED) > 50
    careless = dict(ALLOWED)
    ds = make_phi_slice()
    marks = Markers(3)
    for tag in E1_REMOVED:
        vr = dictionary_VR(tag)
        careless[keyword_for_tag(tag)] = Rule(vm=(0, 99))
        ds[tag] = text_element(tag, vr, marks.text(vr))
    assert all(tag in ds for tag in E1_REMOVED)
    Deidentifier(DeidSettings(KEY), allowed=careless).deidentify(ds)
    data = encode(ds)
    assert [m for m in marks.values if m.encode() in data] == []
    assert not any(tag in ds for tag in E1_REMOVED)


def test_allowlisted_attributes_get_table_e1_actions_too():
    """The allowlist keeps some attributes E.1-1 lists: UIDs are remapped, dates emptied or shifted."""
    for keyword, rule in ALLOWED.items():
        action = action_for(Tag(tag_for_keyword(keyword)))
        if action == "U" and rule.items is None:
            assert rule.remap_uid, keyword
        assert action != "X", f"{keyword}: Table E.1-1 removes it; it cannot be on the allowlist"


@pytest.mark.parametrize(
    ("keyword", "vr", "value", "expected"),
    [
        ("InstanceNumber", "IS", "12 or so", None),
        ("InstanceNumber", "IS", "99999999999999", None),
        ("SliceThickness", "DS", "thin", None),
        ("SliceThickness", "DS", "-2.5", None),
        ("SliceThickness", "DS", "NaN", None),
        ("WindowCenter", "DS", "40\\high", None),
        ("PixelSpacing", "DS", "0.5", None),  # one value where two are needed
        ("PixelSpacing", "DS", "0.5\\0.5\\0.5", None),
        ("Modality", "CS", "CTSCANNER", "OT"),
        ("Modality", "CS", "ct", "OT"),
        ("Modality", "CS", "A" * 17, "OT"),
        ("BodyPartExamined", "CS", "LEFT KNEE OF JOHN", None),
        ("BodyPartExamined", "CS", "KNEE", "KNEE"),
        ("Modality", "CS", "MR", "MR"),
        ("FrameOfReferenceUID", "UI", "1.2.3.PHI", None),
        ("BurnedInAnnotation", "CS", "MAYBE", None),
        ("PhotometricInterpretation", "CS", "MONOCHROME2", "MONOCHROME2"),
    ],
)
def test_retained_values_are_validated_against_their_vr(keyword, vr, value, expected):
    ds = make_phi_slice()
    tag = tag_for_keyword(keyword)
    ds[tag] = text_element(tag, vr, value.split("\\") if "\\" in value else value)
    report = Deidentifier(DeidSettings(KEY)).deidentify_with_report(ds)
    kept = ds.get(keyword)
    assert (str(kept) if kept is not None else None) == expected
    assert report.corrected[keyword] == (0 if expected == value else 1)
    assert value not in report.corrected  # keywords only, never the value


def test_a_photometric_interpretation_that_is_not_one_is_refused(settings_home):
    ds = make_phi_slice()
    ds[0x00280004] = text_element(0x00280004, "CS", "MKPHOTO")
    with pytest.raises(ImportRefused) as refused:
        prepare(encode(ds), settings_home)
    assert "MKPHOTO" not in str(refused.value)


@pytest.fixture
def settings_home(tmp_path):
    return load_settings(home=tmp_path / "home")


def test_alternative_calendar_and_unshifted_dates_are_removed_even_when_dates_are_retained():
    ds = make_phi_slice()
    ds.add_new(0x00100033, "LO", "Mkbirth 5 Tishrei 5718")
    ds.add_new(0x00100034, "LO", "Mkdeath 1 Nisan 5780")
    ds.add_new(0x00100035, "CS", "HEBREW")
    ds.StudyDate = "2019.03.05"  # an ACR-NEMA date: not a DA
    Deidentifier(DeidSettings(KEY, retain_longitudinal_dates=True)).deidentify(ds)
    data = encode(ds)
    assert b"Mkbirth" not in data and b"Mkdeath" not in data and b"HEBREW" not in data
    assert not ds.StudyDate and ds.PatientBirthDate != "19570412"


def test_non_image_sop_classes_are_refused_whatever_they_hold(settings_home):
    pdf = make_phi_slice()
    pdf.SOPClassUID = pdf.file_meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    pdf.EncapsulatedDocument = b"%PDF-1.4 MKPDF marker"
    with pytest.raises(ImportRefused) as refused:
        prepare(encode(pdf), settings_home)
    message = str(refused.value)
    assert "Encapsulated PDF Storage is not an image medvqa can show" in message and "\n" not in message
    unknown = make_phi_slice()
    unknown.SOPClassUID = unknown.file_meta.MediaStorageSOPClassUID = "1.2.3.4.5"
    with pytest.raises(ImportRefused, match="an unknown SOP class is not an image"):
        prepare(encode(unknown), settings_home)
    assert list(settings_home.store_dir.rglob("*.dcm")) == []


def test_text_hidden_in_the_pixel_stream_is_dropped(settings_home):
    """JPEG comment and application segments, and bytes after the end of the image, do not reach the store."""
    import numpy as np
    from pydicom.encaps import encapsulate, generate_frames

    from medvqa.imaging.reader import decode_pixels

    ds = make_phi_slice(rows=32, columns=32)
    ds.BitsStored, ds.HighBit = 16, 15
    pixels = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    ds.PixelData = pixels.tobytes()
    native = encode(ds)
    ds.PixelData = ds.PixelData + b"MKTRAILINGPIXELTEXT!"  # past the image
    record = prepare(encode(ds), settings_home)
    stored = (settings_home.store_dir / record.storage_path).read_bytes()
    assert b"MKTRAILINGPIXELTEXT" not in stored and len(stored) <= len(native) + 400
    from pydicom.data import get_testdata_file

    source = dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    frame = next(generate_frames(source.PixelData, number_of_frames=1))

    def segment(marker: int, body: bytes) -> bytes:
        return bytes((0xFF, marker)) + (len(body) + 2).to_bytes(2, "big") + body

    marked = frame[:2] + segment(0xFE, b"MKJPEGCOMMENT") + segment(0xE1, b"MKAPP1SEGMENT") + frame[2:] + b"MKTAIL"
    source.PixelData = encapsulate([marked])
    record = prepare(encode(source), settings_home)
    stored_ds = dcmread(settings_home.store_dir / record.storage_path)
    stored = (settings_home.store_dir / record.storage_path).read_bytes()
    assert b"MKJPEGCOMMENT" not in stored and b"MKAPP1" not in stored and b"MKTAIL" not in stored
    assert stored_ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian  # still JPEG, only cleaned
    assert np.array_equal(decode_pixels(stored_ds), decode_pixels(dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))))


def test_overlay_bits_above_bits_stored_are_cleared(settings_home):
    import numpy as np

    ds = make_phi_slice()
    pixels = np.frombuffer(ds.PixelData, dtype=np.uint16).copy()
    pixels[:8] |= 0x8000  # an old-style overlay in the unused high bit
    ds.PixelData = pixels.tobytes()
    record = prepare(encode(ds), settings_home)
    stored = dcmread(settings_home.store_dir / record.storage_path)
    assert int(np.asarray(stored.pixel_array).max()) < 4096


VR_CHOICES = sorted(TEXT_VR_VALUES)
SEQUENCE_TAGS = sorted(t for t, e in DicomDictionary.items() if e[0] == "SQ" and e[3] == "" and t >> 16 != 0x0002)
TEXT_TAGS = sorted(
    t
    for t, e in DicomDictionary.items()
    if e[0] in TEXT_VR_VALUES
    and e[3] == ""
    and t >> 16 not in (0x0000, 0x0002, 0xFFFE)
    and (t >> 16) & 0xFF00 not in (0x5000, 0x6000)
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    plants=st.lists(
        st.tuples(st.sampled_from(TEXT_TAGS), st.sampled_from(VR_CHOICES), st.integers(0, 5)), min_size=1, max_size=12
    ),
    sequence_path=st.lists(st.sampled_from(SEQUENCE_TAGS), min_size=5, max_size=5),
    seed=st.integers(0, 10_000),
)
def test_random_tags_vrs_and_depths_never_survive(settings_home, plants, sequence_path, seed):
    """Markers put into random dictionary tags, with their own VR or a random one, at random depths (under
    random sequences, allowlisted or not) never reach the stored file."""
    ds = make_phi_slice()
    marks = Markers(seed)
    for tag, other_vr, depth in plants:
        holder = ds
        for sequence in sequence_path[:depth]:
            if sequence not in holder or not holder[sequence].value:
                holder[sequence] = _sequence_element(sequence)
            holder = holder[sequence].value[0]
        vr = dictionary_VR(tag) if seed % 2 else other_vr
        if vr not in TEXT_VR_VALUES:
            vr = other_vr
        if tag in (0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00280004) and holder is ds:
            continue  # identity and photometric: a bad value there is refused, tested elsewhere
        holder[tag] = text_element(tag, vr, marks.text(vr))
    try:
        record = prepare(encode(ds), settings_home)
    except ImportRefused as refused:
        assert not any(m in str(refused) for m in marks.values)
        return
    stored = (settings_home.store_dir / record.storage_path).read_bytes()
    assert [m for m in marks.values if m.encode() in stored] == []
    assert not any(m in repr(record) for m in marks.values)


def _sequence_element(tag: int):
    from pydicom.dataelem import DataElement

    return DataElement(tag, "SQ", Sequence([Dataset()]))
