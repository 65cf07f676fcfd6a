"""The audit chain on its own (no database): every kind of tampering, many random trials, all detected."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compliance.audit_chain import AnchorError, AuditAnchor, compute_hash, verify_chain
from tests.tampering import TAMPERINGS, build_chain


def anchor_of(events):
    return {e.seq: {e.hash} for e in events}


@given(n=st.integers(1, 40), seed=st.integers(0, 2**32))
def test_untouched_chain_verifies(n, seed):
    events = build_chain(n, random.Random(seed))
    report = verify_chain(events, anchor_of(events))
    assert report.ok and report.events == n and report.first_bad_seq is None
    assert report.unanchored_events == 0


@pytest.mark.parametrize("kind", sorted(TAMPERINGS))
@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 30), seed=st.integers(0, 2**32))
def test_every_tampering_is_detected_at_the_right_event(kind, n, seed):
    rng = random.Random(seed)
    events = build_chain(n, rng)
    anchor = anchor_of(events)
    tampered, expected_first_bad = TAMPERINGS[kind](events, rng)
    report = verify_chain(tampered, anchor)
    assert not report.ok, f"{kind} went unnoticed"
    assert report.first_bad_seq == expected_first_bad, report.reason


@given(n=st.integers(2, 30), lag=st.integers(1, 3), seed=st.integers(0, 2**32))
def test_anchor_lagging_behind_a_crash_is_a_warning_not_a_failure(n, lag, seed):
    events = build_chain(n, random.Random(seed))
    anchor = anchor_of(events[: max(0, n - lag)])
    report = verify_chain(events, anchor)
    assert report.ok
    assert report.unanchored_events == min(lag, n)
    assert report.warnings
    strict = verify_chain(events, anchor, strict=True)
    assert not strict.ok and strict.first_bad_seq == max(1, n - lag + 1)


def test_event_that_never_got_its_own_anchor_line_is_reported():
    events = build_chain(6, random.Random(3))
    anchor = anchor_of(events)
    del anchor[4]  # a crash after commit, or an event forged at the end and covered by a later write
    report = verify_chain(events, anchor)
    assert report.ok and report.first_unanchored_seq == 4 and report.unanchored_events == 1
    assert verify_chain(events, anchor, strict=True).first_bad_seq == 4


def test_two_hashes_anchored_for_one_event_mean_a_rewrite():
    events = build_chain(5, random.Random(1))
    anchor = anchor_of(events)
    anchor[3].add("f" * 64)
    report = verify_chain(events, anchor)
    assert not report.ok and report.first_bad_seq == 3


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


def test_anchor_file_round_trip_ignores_a_line_cut_by_a_crash(tmp_path):
    anchor = AuditAnchor(tmp_path / "a" / "anchor.log")
    anchor.append([(1, "a" * 64), (2, "b" * 64)])
    with anchor.path.open("a") as f:
        f.write("3 cccc")  # the crash came mid-line
    assert anchor.read() == {1: {"a" * 64}, 2: {"b" * 64}}


def test_anchor_with_nul_padding_after_a_power_loss_is_read(tmp_path):
    anchor = AuditAnchor(tmp_path / "anchor.log")
    anchor.append([(1, "a" * 64)])
    with anchor.path.open("ab") as f:
        f.write(b"\x00" * 4096)
    assert anchor.read() == {1: {"a" * 64}}
    anchor.path.write_bytes(b"1 " + b"a" * 64 + b"\n\x00\x00\n2 " + b"b" * 64 + b"\n")
    with pytest.raises(AnchorError, match="line 2"):
        anchor.read()


def test_damaged_or_missing_anchor_is_refused(tmp_path):
    anchor = AuditAnchor(tmp_path / "anchor.log")
    with pytest.raises(AnchorError, match="missing"):
        anchor.read()
    anchor.path.write_text("1 " + "a" * 64 + "\nnot a line\n2 " + "b" * 64 + "\n")
    with pytest.raises(AnchorError, match="line 2"):
        anchor.read()
