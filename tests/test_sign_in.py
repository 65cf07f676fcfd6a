"""Sign-in that resists attack: lockout per name and per source, no account enumeration by message or work
done, an admin unlock, disabling and role changes, bounded fields in the trail, the published demo password
kept to this machine (real SQLite or PostgreSQL)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from compliance.policy import DEMO_PASSWORD
from medvqa.cli import main
from medvqa.db import AuditEvent, SignInAttempt
from medvqa.errors import AccessDenied, InvalidInput, NotFound
from medvqa.services import users
from medvqa.services.audit import verify
from medvqa.services.users import ThrottleSettings, add_user, authenticate, change_role, set_active, unlock
from tests import factories
from tests.factories import OPERATOR, PASSWORD

THROTTLE = ThrottleSettings(max_failures=5, source_max_failures=20)
WRONG = "wrong password here!"


def events(db, action="auth:session:login"):
    with db.read_session() as session:
        return session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)).all()


def fail(db, name, source="10.1.1.1", password=WRONG, throttle=THROTTLE):
    with pytest.raises(AccessDenied) as raised:
        authenticate(db, name, password, source, throttle)
    return str(raised.value)


def test_five_failures_lock_the_account_then_the_right_password_is_refused_until_unlocked(db, clinician):
    for _ in range(4):
        assert fail(db, clinician.name).startswith("sign-in failed")
    fifth = fail(db, clinician.name)
    assert "now locked until" in fifth
    message = fail(db, clinician.name, password=PASSWORD)
    assert message.startswith(f"account {clinician.name!r} is locked after 5 failed sign-ins until ")
    assert message.endswith("; an administrator can unlock it") and "\n" not in message
    lockouts = events(db, "auth:account:lockout")
    assert len(lockouts) == 1 and lockouts[0].details["failures"] == 5 and lockouts[0].outcome == "denied"
    assert events(db)[-1].outcome == "denied" and events(db)[-1].details["reason"] == "account locked"

    unlock(db, OPERATOR, clinician.name)
    assert authenticate(db, clinician.name, PASSWORD, "10.1.1.1", THROTTLE) == clinician
    assert events(db, "user:account:unlock")[-1].actor_name == OPERATOR.name


def test_an_unknown_name_locks_alike_so_messages_do_not_tell_who_has_an_account(db, clinician):
    for name in (clinician.name, "nobody.here"):
        messages = [fail(db, name) for _ in range(6)]
        assert [m.split(":")[0] for m in messages[:5]] == ["sign-in failed"] * 5
        assert messages[5].startswith(f"account {name!r} is locked after 5 failed sign-ins until ")
    first, second = (fail(db, n).replace(repr(n), "NAME") for n in (clinician.name, "nobody.here"))
    assert first[:60] == second[:60]


def test_the_work_done_does_not_depend_on_whether_the_account_exists(db, clinician, monkeypatch):
    """Timing must not tell whether an account exists: both paths verify one argon2 hash (a dummy one for an
    unknown name) and write one attempt and one event; a locked name verifies none, whoever it is."""
    calls = []
    real = users._password_matches
    monkeypatch.setattr(users, "_password_matches", lambda stored, given: calls.append(stored) or real(stored, given))

    def work(name):
        calls.clear()
        with db.read_session() as session:
            before = session.scalar(select(func.count()).select_from(SignInAttempt))
        fail(db, name)
        with db.read_session() as session:
            after = session.scalar(select(func.count()).select_from(SignInAttempt))
        return len(calls), after - before

    assert work(clinician.name) == work("nobody.here") == (1, 1)
    for name in (clinician.name, "nobody.here"):
        for _ in range(4):
            fail(db, name)
    assert work(clinician.name) == work("nobody.here") == (0, 0)  # locked: no password checked, none counted


def test_a_source_that_fails_too_often_is_blocked_for_every_name(db, clinician):
    for number in range(20):
        fail(db, f"guess{number}", source="192.0.2.7")
    message = fail(db, clinician.name, source="192.0.2.7", password=PASSWORD)
    assert message.startswith("too many failed sign-ins from this address: try again after ")
    assert authenticate(db, clinician.name, PASSWORD, "192.0.2.8", THROTTLE) == clinician  # another source


def test_a_lockout_ends_by_itself_after_the_lockout_time(db, clinician):
    short = ThrottleSettings(max_failures=2, window=timedelta(seconds=30), lockout=timedelta(milliseconds=400))
    for _ in range(2):
        fail(db, clinician.name, throttle=short)
    assert "is locked" in fail(db, clinician.name, password=PASSWORD, throttle=short)
    time.sleep(0.5)
    assert authenticate(db, clinician.name, PASSWORD, "10.1.1.1", short) == clinician


def test_a_success_resets_the_count_for_the_name(db, clinician):
    for _ in range(4):
        fail(db, clinician.name)
    authenticate(db, clinician.name, PASSWORD, "10.1.1.1", THROTTLE)
    for _ in range(4):
        assert fail(db, clinician.name).startswith("sign-in failed")


@pytest.mark.parametrize(
    "name",
    ["x" * 65, "x" * 1_000_000, "dr\x00evil", "dr\u202eevil", "\ud800surrogate", "é" * 70, " "],
)
def test_every_name_tried_is_audited_the_same_bounded_way_on_both_backends(db, name):
    """A 1 MB user name, a 65-character one (too long for the column on PostgreSQL), NUL and control
    characters: the failed sign-in is audited, with the name cut and hashed, never stored whole."""
    fail(db, name)
    event = events(db)[-1]
    assert event.outcome == "failed" and len(event.actor_name) <= 64
    if len(name) > 64 or not name.isprintable():
        assert event.actor_name != name and "…#" in event.actor_name
    assert verify(db, strict=True).ok


def test_hostile_names_and_passwords_are_refused_in_one_line(db):
    for password in ("", "x" * 5_000_000):
        message = fail(db, "dr.nobody", password=password)
        assert message.startswith("sign-in failed") and "\n" not in message
    with pytest.raises(InvalidInput, match="at most 1024"):
        add_user(db, OPERATOR, "dr.long", "p" * 2000, "clinician")


def test_disabled_and_enabled_accounts(db, clinician):
    set_active(db, OPERATOR, clinician.name, active=False)
    assert fail(db, clinician.name, password=PASSWORD).startswith("sign-in failed")  # the same message as a typo
    with pytest.raises(InvalidInput, match="already disabled"):
        set_active(db, OPERATOR, clinician.name, active=False)
    set_active(db, OPERATOR, clinician.name, active=True)
    assert authenticate(db, clinician.name, PASSWORD, "10.1.1.1", THROTTLE) == clinician
    assert [e.action for e in events(db, "user:account:disable")] == ["user:account:disable"]
    with pytest.raises(NotFound):
        set_active(db, OPERATOR, "nobody.here", active=False)


def test_only_an_admin_manages_accounts_and_refusals_are_audited(db, clinician):
    reviewer = factories.make_user(db, "reviewer")
    for call in (
        lambda: set_active(db, reviewer, clinician.name, active=False),
        lambda: change_role(db, reviewer, clinician.name, "admin"),
        lambda: unlock(db, reviewer, clinician.name),
    ):
        with pytest.raises(AccessDenied):
            call()
    with db.read_session() as session:
        denied = session.scalars(select(AuditEvent).where(AuditEvent.outcome == "denied")).all()
    assert [e.action for e in denied] == ["user:account:disable", "user:account:change_role", "user:account:unlock"]


def test_the_published_demo_password_signs_in_from_this_machine_only(db):
    add_user(db, OPERATOR, "dr.demo", DEMO_PASSWORD, "clinician")
    for remote in ("10.0.0.5", "192.168.1.20", "2001:db8::1", "0.0.0.0"):
        assert "from this machine only" in fail(db, "dr.demo", source=remote, password=DEMO_PASSWORD)
    for local in (None, "local", "127.0.0.1", "::1"):
        assert authenticate(db, "dr.demo", DEMO_PASSWORD, local, THROTTLE).name == "dr.demo"


def test_cli_user_commands(db, cli_env, clinician):
    runner = CliRunner()
    result = runner.invoke(main, ["users", "disable", clinician.name])
    assert result.exit_code == 0, result.output
    listed = runner.invoke(main, ["users", "list"]).output
    assert f"{clinician.name}" in listed and "disabled" in listed
    assert runner.invoke(main, ["users", "enable", clinician.name]).exit_code == 0
    assert runner.invoke(main, ["users", "role", clinician.name, "reviewer"]).exit_code == 0
    result = runner.invoke(main, ["users", "role", clinician.name, "overlord"])
    assert result.exit_code == 1 and result.output.startswith("medvqa: error: role 'overlord' does not exist")
    for _ in range(5):
        fail(db, clinician.name)
    assert "locked until" in runner.invoke(main, ["users", "list"]).output
    assert runner.invoke(main, ["users", "unlock", clinician.name]).exit_code == 0
    assert "locked until" not in runner.invoke(main, ["users", "list"]).output
    result = runner.invoke(main, ["users", "disable", "nobody.here"])
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output


def test_cli_sign_in_is_throttled_too(db, cli_env, clinician, answer_id):
    runner = CliRunner()
    for _ in range(5):
        result = runner.invoke(
            main, ["feedback", str(answer_id), "--verdict", "correct", "--user", clinician.name], input=WRONG + "\n"
        )
        assert result.exit_code == 1
    result = runner.invoke(
        main, ["feedback", str(answer_id), "--verdict", "correct", "--user", clinician.name], input=PASSWORD + "\n"
    )
    assert result.exit_code == 1 and "is locked after 5 failed sign-ins" in result.output


def test_wrong_signature_passwords_count_towards_the_lockout(db, clinician, answer_id):
    """An unattended reviewer session must not become a way to guess its owner's password."""
    from medvqa.services.review import ReviewInput, adjudicate

    reviewer = factories.make_user(db, "reviewer")
    for _ in range(5):
        with pytest.raises(AccessDenied, match="signature refused: the password does not match"):
            adjudicate(db, reviewer, ReviewInput(answer_id, "correct", "review", WRONG))
    with pytest.raises(AccessDenied, match="signature refused: the account is locked until"):
        adjudicate(db, reviewer, ReviewInput(answer_id, "correct", "review", PASSWORD))
    assert "is locked" in fail(db, reviewer.name, password=PASSWORD)
    assert events(db, "auth:account:lockout")[-1].details["source"] == "signature"
