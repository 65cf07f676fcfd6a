"""The audit chain and its anchor on their own (no database): every kind of tampering, many random trials,
all detected; the anchor's lines authenticated; the crash windows reported as what they are."""

from __future__ import annotations

import dataclasses
import math
import random
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compliance.audit_chain import (
    ABORT,
    COMMIT,
    INTENT,
    AnchorError,
    AnchorRecord,
    AuditAnchor,
    AuditIntegrityError,
    check_details,
    compute_hash,
    parse_strict_json,
    row_digest,
    verify_chain,
)
from tests.tampering import TAMPERINGS, build_chain


def anchor_of(events):
    return AnchorRecord.of((e.seq, e.hash) for e in events)


@given(n=st.integers(1, 40), seed=st.integers(0, 2**32))
def test_untouched_chain_verifies(n, seed):
    events = build_chain(n, random.Random(seed))
    report = verify_chain(events, anchor_of(events))
    assert report.ok and report.events == n and report.first_bad_seq is None
    assert (report.unconfirmed_events, report.unresolved_intents, report.warnings) == (0, 0, [])
    assert report.anchored_seq == n


@pytest.mark.parametrize("kind", sorted(TAMPERINGS))
@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 30), seed=st.integers(0, 2**32), strict=st.booleans())
def test_every_tampering_is_detected_at_the_right_event(kind, n, seed, strict):
    rng = random.Random(seed)
    events = build_chain(n, rng)
    anchor = anchor_of(events)
    tampered, expected_first_bad = TAMPERINGS[kind](events, rng)
    report = verify_chain(tampered, anchor, strict=strict)
    assert not report.ok, f"{kind} went unnoticed"
    assert report.first_bad_seq == expected_first_bad, report.reason


@given(n=st.integers(2, 30), lag=st.integers(1, 3), seed=st.integers(0, 2**32))
def test_writers_stopped_between_commit_and_confirmation_are_a_warning_not_a_failure(n, lag, seed):
    events = build_chain(n, random.Random(seed))
    kept = max(0, n - lag)
    anchor = AnchorRecord.of([(e.seq, e.hash) for e in events[kept:]], kinds=(INTENT,))
    for event in events[:kept]:
        anchor.add(INTENT, event.seq, event.hash)
        anchor.add(COMMIT, event.seq, event.hash)
    report = verify_chain(events, anchor)
    assert report.ok
    assert report.unconfirmed_events == min(lag, n) and report.first_unconfirmed_seq == kept + 1
    assert report.warnings
    strict = verify_chain(events, anchor, strict=True)
    assert not strict.ok and strict.first_bad_seq == kept + 1


def test_an_event_with_no_anchor_line_at_all_fails_the_plain_check():
    """Every writer anchors an intent before committing: an event without one was not written by medvqa."""
    events = build_chain(6, random.Random(3))
    anchor = anchor_of(events)
    del anchor.intents[6], anchor.commits[6]  # an event forged at the end, after the last real write
    report = verify_chain(events, anchor)
    assert not report.ok and report.first_bad_seq == 6 and "no line in the anchor" in report.reason


@pytest.mark.parametrize("cut", [0, 2, 5])
def test_an_emptied_or_shortened_anchor_on_a_longer_history_fails(cut):
    events = build_chain(6, random.Random(4))
    anchor = anchor_of(events[:cut])
    report = verify_chain(events, anchor)
    assert not report.ok and report.first_bad_seq == cut + 1


def test_two_hashes_committed_for_one_event_mean_a_rewrite():
    events = build_chain(5, random.Random(1))
    anchor = anchor_of(events)
    anchor.add(COMMIT, 3, "f" * 64)
    report = verify_chain(events, anchor)
    assert not report.ok and report.first_bad_seq == 3


def test_a_cut_tail_is_told_from_a_write_that_stopped_before_its_commit():
    events = build_chain(5, random.Random(5))
    anchor = anchor_of(events)
    cut = verify_chain(events[:4], anchor)  # event 5 was committed (commit line), then deleted
    assert not cut.ok and cut.first_bad_seq == 5 and "tail was cut" in cut.reason

    pending = anchor_of(events[:4])
    pending.add(INTENT, 5, events[4].hash)  # the writer of event 5 died before (or during) its commit
    report = verify_chain(events[:4], pending)
    assert report.ok and report.unresolved_intents == 1 and report.warnings
    assert not verify_chain(events[:4], pending, strict=True).ok

    pending.add(ABORT, 5, events[4].hash)  # its commit failed and the writer said so
    report = verify_chain(events[:4], pending, strict=True)
    assert report.ok and report.unresolved_intents == 0 and report.warnings == []


def test_a_later_commit_line_from_a_write_after_the_snapshot_is_not_a_cut_tail():
    events = build_chain(5, random.Random(6))
    report = verify_chain(events[:4], anchor_of(events), head_now=5)
    assert report.ok, report.reason


def test_hash_covers_every_field_and_ignores_timestamp_spelling():
    event = build_chain(1, random.Random(2))[0]
    naive = dataclasses.replace(event, ts=event.ts.astimezone(UTC).replace(tzinfo=None))
    assert compute_hash(naive) == compute_hash(event)
    for name, value in [
        ("seq", 2),
        ("actor_user_id", 99),
        ("actor_role", "auditor"),
        ("object_type", "user"),
        ("prev_hash", "1" * 64),
        ("ts", datetime(2020, 1, 1, tzinfo=UTC)),
    ]:
        assert compute_hash(dataclasses.replace(event, **{name: value})) != compute_hash(event), name


# ----------------------------------------------------------------------------------------------- anchor file


def new_anchor(path, key_path=None):
    anchor = AuditAnchor(path, key_path)
    anchor.create()
    return anchor


def test_anchor_file_round_trip_ignores_a_line_cut_by_a_crash(tmp_path):
    anchor = new_anchor(tmp_path / "a" / "anchor.log")
    anchor.append([(1, "a" * 64), (2, "b" * 64)], INTENT)
    anchor.append([(1, "a" * 64), (2, "b" * 64)], COMMIT)
    with anchor.path.open("a") as f:
        f.write("C 3 cccc")  # the crash came mid-line
    record = anchor.read()
    assert record.intents == record.commits == {1: {"a" * 64}, 2: {"b" * 64}}


def test_anchor_with_nul_padding_after_a_power_loss_is_read(tmp_path):
    anchor = new_anchor(tmp_path / "anchor.log")
    anchor.append([(1, "a" * 64)])
    with anchor.path.open("ab") as f:
        f.write(b"\x00" * 4096)
    assert anchor.read().commits == {1: {"a" * 64}}
    line = anchor.path.read_bytes().rstrip(b"\x00")
    anchor.path.write_bytes(line + b"\x00\x00\n" + line)
    with pytest.raises(AnchorError, match="line 2"):
        anchor.read()


def test_damaged_missing_or_folder_anchor_is_refused_in_one_line(tmp_path):
    anchor = AuditAnchor(tmp_path / "anchor.log")
    with pytest.raises(AnchorError, match="missing"):
        anchor.read()
    with pytest.raises(AnchorError, match="missing"):
        anchor.append([(1, "a" * 64)])  # a removed anchor never comes back empty by itself
    anchor.create()
    anchor.append([(1, "a" * 64)])
    good = anchor.path.read_text()
    anchor.path.write_text(good + "not a line\n" + good)
    with pytest.raises(AnchorError, match="line 2"):
        anchor.read()
    folder = AuditAnchor(tmp_path / "folder")
    folder.path.mkdir()
    for call in (folder.read, folder.create, lambda: folder.append([(1, "a" * 64)])):
        with pytest.raises(AnchorError, match="is a folder, not a file") as raised:
            call()
        assert "\n" not in str(raised.value)


@pytest.mark.parametrize("forge", ["mac", "seq", "hash", "kind", "kid"])
def test_a_line_appended_without_the_key_is_refused(tmp_path, forge):
    """Someone who may append to the anchor (append-only storage allows it) but lacks the key cannot add,
    or alter, a line that verifies."""
    anchor = new_anchor(tmp_path / "anchor.log")
    anchor.append([(1, "a" * 64)], INTENT)
    kind, seq, digest, kid, mac = anchor.path.read_text().split()
    changed = {
        "mac": (kind, seq, digest, kid, "0" * 32),
        "seq": (kind, "2", digest, kid, mac),
        "hash": (kind, seq, "b" * 64, kid, mac),
        "kind": ("C", seq, digest, kid, mac),
        "kid": (kind, seq, digest, "k9", mac),
    }[forge]
    with anchor.path.open("a") as f:
        f.write(" ".join(changed) + "\n")
    with pytest.raises(AnchorError, match="line 2 is not authenticated"):
        anchor.read()


def test_key_is_private_created_with_the_anchor_and_needed_once_lines_exist(tmp_path):
    anchor = new_anchor(tmp_path / "anchor.log", tmp_path / "keys" / "anchor.key")
    assert anchor.keys.path.stat().st_mode & 0o777 == 0o600
    anchor.append([(1, "a" * 64)])
    assert anchor.keys.path.read_text() not in anchor.path.read_text()
    anchor.keys.path.unlink()
    with pytest.raises(AnchorError, match=r"key .* is missing"):
        anchor.read()
    with pytest.raises(AnchorError, match=r"key .* is missing"):
        anchor.append([(2, "b" * 64)])  # a new key now would let anyone who deleted the old one sign lines


def test_rotation_keeps_old_lines_valid_and_retires_the_old_key(tmp_path):
    anchor = new_anchor(tmp_path / "anchor.log")
    anchor.append([(1, "a" * 64)])
    old_line = anchor.path.read_text()
    assert anchor.keys.rotate() == "k2"
    assert anchor.keys.path.stat().st_mode & 0o777 == 0o600
    anchor.append([(2, "b" * 64)])
    assert anchor.read().commits == {1: {"a" * 64}, 2: {"b" * 64}}
    assert anchor.path.read_text().splitlines()[1].split()[3] == "k2"
    with anchor.path.open("a") as f:  # a line signed with the old key after the new one was in use
        f.write(old_line)
    with pytest.raises(AnchorError, match="line 3 is signed with a retired key"):
        anchor.read()


# ------------------------------------------------------------------------------------------- canonical JSON


def test_stored_details_with_a_duplicate_key_or_nan_are_refused():
    assert parse_strict_json('{"a": 1, "b": {"c": [1, 2]}}') == {"a": 1, "b": {"c": [1, 2]}}
    for text in ('{"a": 1, "a": 2}', '{"x": {"a": 1, "a": 1}}', '{"a": NaN}', '{"a": Infinity}', "{"):
        with pytest.raises(AuditIntegrityError):
            parse_strict_json(text)


@pytest.mark.parametrize(
    "details",
    [{1: "a", "1": "b"}, {"a": math.nan}, {"a": math.inf}, {"a": {2: "x"}}, {"a": object()}, {"a": b"bytes"}],
)
def test_details_that_canonical_json_cannot_carry_are_refused_on_write(details):
    with pytest.raises(AuditIntegrityError):
        check_details(details)


def test_row_digest_covers_every_column_and_its_type():
    row = {"id": 1, "verdict": "correct", "created_at": datetime(2026, 1, 1, tzinfo=UTC), "score": 0.5}
    digest = row_digest("feedback", row)
    assert digest == row_digest("feedback", dict(reversed(row.items())))  # column order does not matter
    assert digest == row_digest("feedback", {**row, "created_at": datetime(2026, 1, 1)})  # naive means UTC
    for change in ({"verdict": "partial"}, {"score": 0.50001}, {"id": "1"}, {"extra": None}):
        assert row_digest("feedback", {**row, **change}) != digest, change
    assert row_digest("answers", row) != digest
