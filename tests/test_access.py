"""The role x action policy: deny by default, and every refusal lands in the audit trail."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from compliance.policy import POLICY, Action, Role, is_allowed, policy_markdown
from medvqa.db import AuditEvent, Feedback, User
from medvqa.errors import AccessDenied
from medvqa.services.feedback import FeedbackInput, give_feedback
from medvqa.services.users import add_user
from tests import factories

CASES = [
    # (role, action, allowed)
    ("admin", Action.USER_CREATE, True),
    ("clinician", Action.USER_CREATE, False),
    ("clinician", Action.QUESTION_ASK, True),
    ("clinician", Action.FEEDBACK_CREATE, True),
    ("clinician", Action.REVIEW_SIGN, False),
    ("reviewer", Action.REVIEW_SIGN, True),
    ("ml_engineer", Action.FEEDBACK_CREATE, False),
    ("ml_engineer", Action.ADAPTER_PROMOTE_REQUEST, True),
    ("ml_engineer", Action.ADAPTER_PROMOTE_APPROVE, False),
    ("admin", Action.ADAPTER_PROMOTE_APPROVE, True),
    ("auditor", Action.AUDIT_VERIFY, True),
    ("auditor", Action.QUESTION_ASK, False),
    ("admin", Action.QUESTION_ASK, False),
    ("wizard", Action.AUDIT_VERIFY, False),
    ("admin", "system:everything:do", False),
    ("admin", "", False),
]


@pytest.mark.parametrize(("role", "action", "allowed"), CASES)
def test_policy_table(role, action, allowed):
    assert is_allowed(role, action) is allowed


def test_every_action_has_an_owner_and_the_table_renders():
    assert set(POLICY) == set(Action)
    assert all(POLICY[action] for action in Action)
    table = policy_markdown()
    assert all(f"`{action}`" in table for action in Action)
    assert all(role in table.splitlines()[0] for role in Role)


def test_refused_action_is_audited_and_changes_nothing(db, clinician):
    with pytest.raises(AccessDenied, match="'clinician' may not perform user:account:create"):
        add_user(db, clinician, "mallory", factories.PASSWORD, "admin")
    with db.read_session() as session:
        assert session.scalar(select(func.count()).where(User.username == "mallory")) == 0
        event = session.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()
    assert (event.action, event.outcome, event.actor_user_id) == ("user:account:create", "denied", clinician.user_id)
    assert event.object_id == "mallory" and "may not" in event.details["reason"]


def test_ml_engineer_cannot_rate_answers(db, answer_id):
    engineer = factories.make_user(db, "ml_engineer")
    with pytest.raises(AccessDenied):
        give_feedback(db, engineer, FeedbackInput(answer_id, "correct", "k"))
    with db.read_session() as session:
        assert session.scalar(select(func.count()).select_from(Feedback)) == 0
        denied = session.scalars(select(AuditEvent).where(AuditEvent.outcome == "denied")).one()
    assert denied.actor_name == engineer.name and denied.object_id == str(answer_id)
