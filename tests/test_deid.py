"""De-identification (PS3.15 Annex E, Basic Profile): nothing identifying survives, at any depth."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from compliance.deid import MAX_SEQUENCE_DEPTH, Deidentifier, DeidError, DeidSettings, _profile, load_site_key
from tests.phi_factory import ORIGINAL_UIDS, PHI, encode, make_phi_slice, phi_strings

UID = re.compile(r"^2\.25\.[1-9][0-9]*$")
KEY = bytes(range(32))


def deidentified(index=0, key=KEY, retain_dates=False):
    ds = make_phi_slice(index)
    Deidentifier(DeidSettings(key, retain_dates)).deidentify(ds)
    return ds


def test_no_fake_phi_survives_anywhere_in_the_file():
    data = encode(deidentified())
    for value in phi_strings():
        assert value.encode() not in data, value


def test_profile_is_recorded():
    ds = deidentified()
    assert ds.PatientIdentityRemoved == "YES"
    # CID 7050: the Basic Profile, Clean Graphics, Clean Structured Content and Clean Descriptors options
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113103", "113104", "113105"]
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert "StudyDate" not in ds or not ds.StudyDate


def test_private_tags_are_removed_at_every_depth():
    ds = deidentified()

    def private_tags(dataset):
        for element in dataset:
            yield element.tag.is_private
            if element.VR == "SQ":
                for item in element.value:
                    yield from private_tags(item)

    assert not any(private_tags(ds))


def test_uids_are_valid_keyed_deterministic_and_references_stay_consistent():
    first, again, other_site = deidentified(), deidentified(), deidentified(key=b"another site key, 32 bytes long!")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        value = str(first[keyword].value)
        assert UID.match(value) and len(value) <= 64, keyword
        assert value == again[keyword].value
        assert value != other_site[keyword].value
    assert first.SourceImageSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    assert str(first.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.2"  # standard UIDs are kept
    assert set(ORIGINAL_UIDS.values()).isdisjoint({first.StudyInstanceUID, first.SeriesInstanceUID})


def test_same_patient_same_pseudonym_across_instances():
    a, b = deidentified(0), deidentified(1)
    assert a.PatientID == b.PatientID == a.PatientName and a.PatientID.startswith("ANON-")
    assert a.StudyInstanceUID == b.StudyInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID


def test_retained_dates_are_shifted_by_one_fixed_offset_per_patient():
    a, b = deidentified(0, retain_dates=True), deidentified(1, retain_dates=True)
    assert a.StudyDate == b.StudyDate != PHI["StudyDate"]
    assert a.PatientBirthDate != PHI["PatientBirthDate"] and len(a.PatientBirthDate) == 8
    days = Deidentifier(DeidSettings(KEY, True)).date_shift_days(a.PatientID)
    assert -3650 <= days <= -1
    codes = [item.CodeValue for item in a.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113103", "113104", "113105", "113107"]
    assert a.LongitudinalTemporalInformationModified == "MODIFIED"


def test_unparseable_date_is_emptied_never_kept():
    ds = make_phi_slice()
    ds.StudyDate = "2019-03-05"
    Deidentifier(DeidSettings(KEY, True)).deidentify(ds)
    assert not ds.StudyDate


def test_too_deep_nesting_is_refused():
    ds = make_phi_slice()
    item = ds
    for _ in range(MAX_SEQUENCE_DEPTH + 2):
        child = Dataset()
        item.ReferencedSeriesSequence = Sequence([child])
        item = child
    with pytest.raises(DeidError, match="nested deeper"):
        Deidentifier(DeidSettings(KEY)).deidentify(ds)


def test_site_key_is_created_once_private_and_reused(tmp_path):
    path = tmp_path / "home" / "deid.key"
    key = load_site_key(path)
    assert len(key) == 32 and load_site_key(path) == key
    assert path.stat().st_mode & 0o777 == 0o600


PLANTABLE_VRS = ("LO", "SH", "PN", "LT", "ST", "UT", "UC", "AE", "CS")
TEXT_TAGS = sorted(
    tag
    for tag, action in _profile()[0].items()
    if action in ("X", "Z", "D")
    and tag >> 16 not in (0x0002, 0x7FE0)
    and dictionary_has_tag(tag)
    and dictionary_VR(tag) in PLANTABLE_VRS
)


@settings(max_examples=60, deadline=None)
@given(
    tags=st.lists(st.sampled_from(TEXT_TAGS), min_size=1, max_size=8, unique=True),
    depth=st.integers(0, 4),
    marker=st.integers(10**5, 10**6),
)
def test_any_profile_attribute_at_any_depth_is_cleaned(tags, depth, marker):
    """Fake PHI put into random attributes of Table E.1-1, at a random depth, never survives."""
    ds = make_phi_slice()
    holder = ds
    for _ in range(depth):
        child = Dataset()
        holder.ReferencedSeriesSequence = Sequence([child])
        holder = child
    planted = []
    for tag in tags:
        vr = dictionary_VR(tag)
        value = f"PHI{marker}{tag:08X}"[:16] if vr in ("SH", "AE", "CS") else f"Phi marker {marker} {tag:08X}"
        holder.add_new(tag, vr, value)
        planted.append(value)
    Deidentifier(DeidSettings(KEY)).deidentify(ds)
    data = encode(ds)
    for value in planted:
        assert value.encode() not in data, value
