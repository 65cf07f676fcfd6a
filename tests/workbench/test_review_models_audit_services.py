"""Review (queue, signed adjudication, double reading, kappa), promotion by two people, rollback, audit log."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from medvqa.db import Adapter, AdapterStatus, AuditEvent, Review
from medvqa.errors import AccessDenied, InvalidInput
from medvqa.services.audit_log import AuditFilter, export_csv, list_events, verify_trail
from medvqa.services.feedback import FeedbackInput, give_feedback
from medvqa.services.promotion import (
    approve_promotion,
    compare_metrics,
    list_adapters,
    request_promotion,
    rollback,
)
from medvqa.services.review import (
    QueueFilter,
    ReviewInput,
    adjudicate,
    agreement,
    cohen_kappa,
    review_queue,
)
from medvqa.services.sessions import is_idle, sign_in_external, sign_out
from tests import factories


def answer_with_confidence(db, actor, confidence, question_type=""):
    from medvqa.services.answers import AnswerRecord, record_answer

    record = AnswerRecord("yes", "m@0", "vqa-v1", "a" * 64, "transformers", 1.0, confidence=confidence)
    study = factories.make_study(db)
    return record_answer(db, actor, study, "Is it?", record, question_type=question_type).id


def signed(answer_id, verdict="correct", password=factories.PASSWORD, reference=None):
    return ReviewInput(answer_id, verdict, "review", password, reference_answer=reference)


def test_queue_puts_disagreements_then_low_confidence_first(db, clinician):
    reviewer = factories.make_user(db, "reviewer")
    sure, unsure, disputed = (answer_with_confidence(db, clinician, c, "PRES") for c in (0.9, 0.2, 0.95))
    unknown = answer_with_confidence(db, clinician, None, "ABN")
    give_feedback(db, clinician, FeedbackInput(disputed, "incorrect", "k1", correction="no"))
    queue = review_queue(db, reviewer)
    assert [row["answer_id"] for row in queue] == [disputed, unknown, unsure, sure]
    assert queue[0]["disagreement"] and queue[0]["feedback"] == "incorrect"
    only_pres = review_queue(db, reviewer, QueueFilter(question_type="PRES"))
    assert [row["answer_id"] for row in only_pres] == [disputed, unsure, sure]
    assert review_queue(db, reviewer, QueueFilter(adapter_ref="sha-of-something")) == []


def test_adjudication_is_signed_double_read_and_agreement_is_kappa(db, clinician):
    first, second = factories.make_user(db, "reviewer"), factories.make_user(db, "reviewer")
    answers = [answer_with_confidence(db, clinician, 0.5) for _ in range(3)]
    for answer_id, (a, b) in zip(
        answers, [("correct", "correct"), ("incorrect", "incorrect"), ("correct", "incorrect")], strict=True
    ):
        adjudicate(db, first, signed(answer_id, a, reference=None if a == "correct" else "no"))
        assert answer_id not in [r["answer_id"] for r in review_queue(db, first)]
        adjudicate(db, second, signed(answer_id, b, reference=None if b == "correct" else "no"))
    with db.read_session() as session:
        reviews = session.scalars(select(Review).order_by(Review.id)).all()
        sign_events = session.scalars(select(AuditEvent).where(AuditEvent.action == "answer:review:sign")).all()
    assert [r.reading for r in reviews] == [1, 2] * 3 and all(r.signed_at and r.signature_meaning for r in reviews)
    assert {"name", "time", "meaning"} <= set(sign_events[0].details)
    result = agreement(db, first)
    # p_o = 2/3; first reader: correct 2, incorrect 1; second: correct 1, incorrect 2 -> p_e = (2+2)/9
    assert result.pairs == 3 and result.kappa == pytest.approx((2 / 3 - 4 / 9) / (1 - 4 / 9))
    with pytest.raises(InvalidInput, match="already has 2 readings"):
        adjudicate(db, factories.make_user(db, "reviewer"), signed(answers[0]))


def test_the_same_reviewer_cannot_read_twice_and_a_wrong_password_is_audited(db, clinician):
    reviewer = factories.make_user(db, "reviewer")
    answer_id = answer_with_confidence(db, clinician, 0.5)
    with pytest.raises(AccessDenied, match="signature refused"):
        adjudicate(db, reviewer, signed(answer_id, password="not the password"))
    with pytest.raises(InvalidInput, match="needs the reference answer"):
        adjudicate(db, reviewer, signed(answer_id, "incorrect"))
    adjudicate(db, reviewer, signed(answer_id))
    with pytest.raises(InvalidInput, match="already read answer"):
        adjudicate(db, reviewer, signed(answer_id))  # a double click makes no second reading
    with db.read_session() as session:
        failed = session.scalars(select(AuditEvent).where(AuditEvent.outcome == "failed")).all()
        assert len(session.scalars(select(Review)).all()) == 1
    assert [e.action for e in failed] == ["answer:review:sign"]


@pytest.mark.parametrize(
    ("pairs", "kappa"),
    [
        ([("correct", "correct"), ("incorrect", "incorrect")], 1.0),
        ([("correct", "incorrect"), ("incorrect", "correct")], -1.0),
        ([("correct", "correct")] * 3, None),  # chance agreement is 1: kappa undefined
        ([], None),
    ],
)
def test_cohen_kappa(pairs, kappa):
    assert cohen_kappa(pairs).kappa == kappa


PASSED_GATE = {"gate": {"passed": True, "reasons": []}}


def make_adapter(db, name, status=AdapterStatus.CANDIDATE, metrics=None):
    """An adapter row as a round leaves it; by default its round passed the promotion gate."""
    with db.session() as session, session.begin():
        row = Adapter(name=name, sha256=name.ljust(64, "0"), path=f"/adapters/{name}", base_model_ref="m@0")
        row.metrics, row.status = {**PASSED_GATE, **(metrics or {})}, status
        session.add(row)
        session.flush()
        return row.id


def status_of(db):
    with db.read_session() as session:
        return {a.name: a.status.value for a in session.scalars(select(Adapter))}


def test_promotion_needs_a_request_and_another_persons_approval_and_rolls_back(db):
    engineer, admin = factories.make_user(db, "ml_engineer"), factories.make_user(db, "admin")
    first, second = make_adapter(db, "round1"), make_adapter(db, "round2")
    with pytest.raises(InvalidInput, match="no promotion request"):
        approve_promotion(db, admin, first)
    with pytest.raises(AccessDenied, match="may not perform model:adapter:approve_promotion"):
        approve_promotion(db, engineer, first)
    request_promotion(db, engineer, first, "beats the base on the locked test set")
    with pytest.raises(InvalidInput, match="already has a promotion request"):
        request_promotion(db, engineer, first, "again")
    assert [a["requested_by"] for a in list_adapters(db, engineer) if a["id"] == first] == [engineer.name]
    approve_promotion(db, admin, first)
    request_promotion(db, engineer, second, "round 2 is better")
    approve_promotion(db, admin, second)
    assert status_of(db) == {"round1": "retired", "round2": "live"}
    assert rollback(db, engineer, "round 2 hallucinates") == first
    assert status_of(db) == {"round1": "live", "round2": "retired"}
    assert rollback(db, admin, "back to base") is None
    assert status_of(db) == {"round1": "retired", "round2": "retired"}
    with pytest.raises(InvalidInput, match="nothing to roll back"):
        rollback(db, admin, "again")


def test_comparison_rows_per_question_type_and_organ():
    candidate = {
        "by_question_type": {"PRES": {"overall_accuracy": 0.7}},
        "by_organ": {"HEAD": {"overall_accuracy": 0.6}},
    }
    live = {"by_question_type": {"PRES": {"overall_accuracy": 0.5}}}
    rows = compare_metrics(candidate, live)
    assert {(r["group"], r["subgroup"], r["adapter"], r["value"]) for r in rows} == {
        ("question_type", "PRES", "candidate", 0.7),
        ("organ", "HEAD", "candidate", 0.6),
        ("question_type", "PRES", "live", 0.5),
    }


def test_audit_log_filters_exports_and_verifies_and_records_both(db, clinician):
    auditor = factories.make_user(db, "auditor")
    answer_with_confidence(db, clinician, 0.5)
    mine = list_events(db, auditor, AuditFilter(user=clinician.name))
    assert [e["action"] for e in mine] == ["answer:question:ask"]
    later = datetime.now(UTC) + timedelta(hours=1)
    assert list_events(db, auditor, AuditFilter(since=later)) == []
    with pytest.raises(InvalidInput, match="time zone"):
        AuditFilter(since=datetime(2024, 1, 1))
    exported = list(csv.DictReader(io.StringIO(export_csv(db, auditor, AuditFilter(action="answer:question:ask")))))
    assert [row["actor_name"] for row in exported] == [clinician.name] and len(exported[0]["hash"]) == 64
    assert verify_trail(db, auditor).ok
    actions = [e["action"] for e in list_events(db, auditor, AuditFilter(user=auditor.name))]
    assert actions == ["audit:chain:verify", "audit:event:export"]
    with pytest.raises(AccessDenied):
        export_csv(db, clinician)


def test_external_sign_in_maps_to_a_local_account_and_sign_out_is_audited(db, clinician):
    actor = sign_in_external(db, clinician.name, "hospital-oidc")
    assert actor == clinician
    with pytest.raises(AccessDenied, match="no active workbench account"):
        sign_in_external(db, "stranger", "hospital-oidc")
    sign_out(db, actor, "idle timeout")
    with db.read_session() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action.like("auth:%"))).all()
    assert [(e.action, e.outcome) for e in events][-3:] == [
        ("auth:session:login", "success"),
        ("auth:session:login", "failed"),
        ("auth:session:logout", "success"),
    ]
    now = datetime.now(UTC)
    assert is_idle(now - timedelta(minutes=16), now, 15) and not is_idle(now - timedelta(minutes=14), now, 15)


@pytest.mark.parametrize(
    ("metrics", "why"),
    [
        ({"gate": {"passed": False, "reasons": ["PRES dropped 4.0 points"]}}, "PRES dropped 4.0 points"),
        ({}, "no gate decision"),
    ],
)
def test_a_candidate_that_failed_or_lacks_the_gate_cannot_be_requested(db, metrics, why):
    engineer = factories.make_user(db, "ml_engineer")
    adapter_id = make_adapter(db, "r")
    with db.session() as session, session.begin():
        session.get(Adapter, adapter_id).metrics = metrics  # replaces the passing gate make_adapter gives
    with pytest.raises(InvalidInput, match=f"promotion gate failed .*{why}"):
        request_promotion(db, engineer, adapter_id, "looks good")
    with db.read_session() as session:
        event = session.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()
    assert (event.action, event.outcome) == ("model:adapter:request_promotion", "failed")
    assert why in event.details["reason"]
    assert status_of(db) == {"r": "candidate"}


def test_csv_export_defuses_spreadsheet_formulas_unless_raw_is_asked(db):
    from medvqa.services import audit
    from medvqa.services.transaction import write

    auditor = factories.make_user(db, "auditor")
    write(db, lambda s: audit.record(s, auditor, "audit:chain:verify", "audit", '=HYPERLINK("http://x")'))
    write(db, lambda s: audit.record(s, auditor, "audit:chain:verify", "audit", "-2+3"))
    safe = list(csv.DictReader(io.StringIO(export_csv(db, auditor, AuditFilter(action="audit:chain:verify")))))
    assert [row["object_id"] for row in safe] == ['\'=HYPERLINK("http://x")', "'-2+3"]
    assert all(len(row["hash"]) == 64 for row in safe)  # hex hashes never need defusing
    raw = export_csv(db, auditor, AuditFilter(action="audit:chain:verify"), raw=True)
    assert [row["object_id"] for row in csv.DictReader(io.StringIO(raw))] == ['=HYPERLINK("http://x")', "-2+3"]
    exports = list_events(db, auditor, AuditFilter(action="audit:event:export"))
    forms = [json.loads(e["details"])["form"] for e in exports]
    assert sorted(forms) == ["raw", "spreadsheet-safe"]
