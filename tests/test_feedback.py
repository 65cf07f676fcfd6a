"""Feedback: one record per submission, corrections as new rows, and all-or-nothing writes."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from compliance.audit_chain import COMMIT
from medvqa.db import AuditEvent, Feedback
from medvqa.errors import DatabaseError, IdempotencyConflict, InvalidInput, NotFound
from medvqa.services import audit
from medvqa.services.audit import verify
from medvqa.services.feedback import FeedbackInput, give_feedback


def counts(db):
    with db.read_session() as session:
        feedback = session.scalar(select(func.count()).select_from(Feedback))
        events = session.scalar(select(func.count()).select_from(AuditEvent))
    return feedback, events


def events_for(db, action):
    with db.read_session() as session:
        return session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)).all()


def test_feedback_and_its_audit_event_land_together(db, clinician, answer_id):
    result = give_feedback(db, clinician, FeedbackInput(answer_id, "incorrect", "k1", correction="no fracture"))
    assert result.created and result.feedback.version == 1
    [event] = events_for(db, "answer:feedback:create")
    assert event.object_id == str(result.feedback.id) and event.actor_user_id == clinician.user_id
    assert event.details["new"] == {"verdict": "incorrect", "correction": "no fracture", "comment": None}
    assert audit.verify(db).ok


def test_repeated_submission_gives_one_record(db, clinician, answer_id):
    item = FeedbackInput(answer_id, "correct", "click-1")
    first = give_feedback(db, clinician, item)
    again = give_feedback(db, clinician, item)
    assert again.feedback.id == first.feedback.id and not again.created
    assert counts(db) == (1, 4)  # account, study, answer, one feedback event


def test_same_key_with_a_different_body_is_refused_and_audited(db, clinician, answer_id):
    give_feedback(db, clinician, FeedbackInput(answer_id, "correct", "click-1"))
    with pytest.raises(IdempotencyConflict, match="click-1"):
        give_feedback(db, clinician, FeedbackInput(answer_id, "incorrect", "click-1"))
    with db.read_session() as session:
        assert session.scalars(select(Feedback.verdict)).all() == ["correct"]
    [failed] = [e for e in events_for(db, "answer:feedback:create") if e.outcome == "failed"]
    assert failed.details["idempotency_key"] == "click-1"


def test_a_correction_supersedes_without_changing_the_original(db, clinician, answer_id):
    first = give_feedback(db, clinician, FeedbackInput(answer_id, "correct", "k1")).feedback
    fix = FeedbackInput(
        answer_id, "partial", "k2", correction="small effusion", supersedes_id=first.id, reason="re-read"
    )
    second = give_feedback(db, clinician, fix).feedback
    assert (second.version, second.supersedes_id, second.reason) == (2, first.id, "re-read")
    with db.read_session() as session:
        assert session.get(Feedback, first.id).verdict == "correct"
    [event] = events_for(db, "answer:feedback:supersede")
    assert event.details["old"]["verdict"] == "correct" and event.details["new"]["verdict"] == "partial"
    fork = FeedbackInput(answer_id, "incorrect", "k3", supersedes_id=first.id, reason="again")
    with pytest.raises(InvalidInput, match="already superseded"):
        give_feedback(db, clinician, fork)


@pytest.mark.parametrize(
    ("item", "error", "message"),
    [
        (dict(verdict="maybe"), InvalidInput, "verdict 'maybe'"),
        (dict(idempotency_key=""), InvalidInput, "idempotency key"),
        (dict(idempotency_key="x" * 129), InvalidInput, "idempotency key"),
        (dict(supersedes_id=1), InvalidInput, "needs a reason"),
        (dict(supersedes_id=999, reason="r"), NotFound, "feedback 999"),
        (dict(answer_id=999), NotFound, "answer 999 does not exist"),
    ],
)
def test_bad_feedback_is_refused_and_stores_nothing(db, clinician, answer_id, item, error, message):
    before = counts(db)
    fields = {"answer_id": answer_id, "verdict": "correct", "idempotency_key": "k", **item}
    with pytest.raises(error, match=message):
        give_feedback(db, clinician, FeedbackInput(**fields))
    assert counts(db) == before


def test_crash_inside_the_transaction_leaves_nothing_half_written(db, clinician, answer_id, monkeypatch):
    before = counts(db)

    def crash(*args, **kwargs):
        raise RuntimeError("power cut between the feedback row and its audit event")

    monkeypatch.setattr(audit, "record", crash)
    with pytest.raises(RuntimeError):
        give_feedback(db, clinician, FeedbackInput(answer_id, "correct", "k1"))
    monkeypatch.undo()
    assert counts(db) == before
    assert give_feedback(db, clinician, FeedbackInput(answer_id, "correct", "k1")).created  # the key is free
    assert audit.verify(db).ok


def test_an_anchor_that_cannot_be_written_refuses_the_write_and_stores_nothing(db, clinician, answer_id, tmp_path):
    """The intent line goes to the anchor before the commit: no anchor, no write (and one clear line)."""
    before = counts(db)
    db.anchor.path = tmp_path / "is-a-directory"
    db.anchor.path.mkdir()
    with pytest.raises(DatabaseError, match=r"audit anchor .* cannot be written, so nothing was saved"):
        give_feedback(db, clinician, FeedbackInput(answer_id, "correct", "k1"))
    assert counts(db) == before


def test_a_failing_confirmation_does_not_fail_a_committed_write(db, clinician, answer_id, monkeypatch):
    """After the commit, the anchor's commit line is best effort: the intent line already covers the event."""
    intent_only = db.anchor.append

    def append(heads, kind=COMMIT, durable=True):
        if kind == COMMIT:
            raise OSError("disk full")
        intent_only(heads, kind, durable)

    monkeypatch.setattr(db.anchor, "append", append)
    result = give_feedback(db, clinician, FeedbackInput(answer_id, "correct", "k1"))
    assert result.created
    assert counts(db)[0] == 1
    report = verify(db)
    assert report.ok and report.unconfirmed_events == 1 and report.warnings
    assert not verify(db, strict=True).ok
