"""Rounds started from the workbench run as a background process, one at a time, with their state on disk:
it survives a refresh, reads back its outcome, can be cancelled, and a job whose process died says so."""

# ruff: noqa: F811 - fixtures imported from tests/ helpers are test parameters by design
from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
from sqlalchemy import select

from medvqa.config import load_settings
from medvqa.db import AuditEvent, TrainingRound
from medvqa.errors import AccessDenied, InvalidInput
from medvqa.services.round_jobs import (
    CANCELLED,
    FAILED,
    FINISHED,
    RUNNING,
    JobOptions,
    cancel_round_job,
    jobs_dir,
    latest_job,
    process_running,
    round_readiness,
    start_round_job,
)
from tests import factories
from tests.model_factory import tiny_checkpoints  # noqa: F401 - pytest fixture
from tests.round_factory import (
    cheap_passwords,  # noqa: F401 - pytest fixture
    import_image,
    record_model_answer,
    review,
    write_locked_test_set,
    write_png,
)

QUICK = JobOptions(epochs=1.0, max_steps=2)


@pytest.fixture
def env(db, cli_env, tmp_path, tiny_checkpoints, cheap_passwords, monkeypatch):
    """Four patients with two reviewed answers each, a locked test set, the tiny LLaVA: configured through the
    environment, as the workbench's process is, so that the job's own process sees the same settings."""
    pngs = [write_png(tmp_path / f"img{i}.png", i) for i in range(6)]
    locked = write_locked_test_set(tmp_path / "locked.jsonl", pngs[4:])
    variables = {
        "MEDVQA_BASE_MODEL": str(tiny_checkpoints("llava")),
        "MEDVQA_DEVICE": "cpu",
        "MEDVQA_LOCKED_TEST_SET": str(locked),
        "MEDVQA_ROUND_MIN_EXAMPLES": "4",
        "MEDVQA_ROUND_VALIDATION_FRACTION": "0.25",
        "OMP_NUM_THREADS": "1",
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    clinician, reviewer = factories.make_user(db, "clinician"), factories.make_user(db, "reviewer")
    for png in pngs[:4]:
        image = import_image(db, settings, png)
        for question, said, reference in (("Is there a mass?", "yes", "no"), ("Which organ is this?", "lung", "liver")):
            review(
                db,
                reviewer,
                record_model_answer(db, settings, clinician, image, question, said),
                "incorrect",
                reference,
            )
    engineer = factories.make_user(db, "ml_engineer")
    yield settings, engineer
    job = latest_job(db, engineer, settings)
    if job is not None and job.state == RUNNING and job.pid:  # never leave a process behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGTERM)


def wait_for_end(db, actor, settings, seconds=240):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = latest_job(db, actor, settings)
        if job.state != RUNNING:
            return job
        time.sleep(1)
    raise AssertionError(f"the round job did not end in {seconds} s; its log:\n{job.log_tail}")


def events(db, action):
    with db.read_session() as session:
        return session.scalars(select(AuditEvent).where(AuditEvent.action == action)).all()


def test_a_round_runs_in_the_background_one_at_a_time_and_its_outcome_is_read_back(db, env):
    settings, engineer = env
    ready = round_readiness(db, engineer, settings)
    assert (ready.usable, ready.since_last_round, ready.min_examples, ready.last_round_id) == (8, 8, 4, None)
    job = start_round_job(db, engineer, settings, QUICK)
    assert job.state == RUNNING and job.started_by == engineer.name
    with pytest.raises(InvalidInput, match="already running"):
        start_round_job(db, engineer, settings, QUICK)
    done = wait_for_end(db, engineer, settings)
    assert done.state == FINISHED, done.log_tail
    assert done.round_id is not None and isinstance(done.gate_passed, bool) and done.progress == 1.0
    assert f"round {done.round_id}: gate" in done.log_tail
    with db.read_session() as session:
        assert session.get(TrainingRound, done.round_id) is not None
    assert [e.actor_name for e in events(db, "training:round:start")] == [engineer.name]
    assert [e.outcome for e in events(db, "training:round:run")] == ["success"]  # run as the engineer
    after = round_readiness(db, engineer, settings)
    assert after.last_round_id == done.round_id and after.since_last_round == 0


def test_cancel_stops_the_process_and_frees_the_slot(db, env):
    settings, engineer = env
    job = start_round_job(db, engineer, settings, QUICK)
    cancelled = cancel_round_job(db, engineer, settings, job.name)
    assert cancelled.state == CANCELLED and f"cancelled by {engineer.name}" in cancelled.error
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process_running(job.pid):
        time.sleep(0.2)
    assert not process_running(job.pid)
    assert latest_job(db, engineer, settings).state == CANCELLED
    assert [e.details["job"] for e in events(db, "training:round:cancel")] == [job.name]
    with pytest.raises(InvalidInput, match="not running"):
        cancel_round_job(db, engineer, settings, job.name)
    again = start_round_job(db, engineer, settings, QUICK)  # the slot is free
    assert again.name != job.name and again.state == RUNNING
    cancel_round_job(db, engineer, settings, again.name)


def test_a_job_whose_process_died_reads_as_failed_and_frees_the_slot(db, env):
    settings, engineer = env
    job = start_round_job(db, engineer, settings, QUICK)
    os.killpg(job.pid, signal.SIGKILL)  # killed with no chance to write its end
    deadline = time.monotonic() + 20
    while latest_job(db, engineer, settings).state == RUNNING and time.monotonic() < deadline:
        time.sleep(0.2)
    dead = latest_job(db, engineer, settings)
    assert dead.state == FAILED and "ended without a result" in dead.error
    assert not (jobs_dir(settings) / "running.lock").exists()


def test_only_ml_engineers_start_or_cancel_rounds(db, env):
    settings, _ = env
    for role in ("reviewer", "admin", "clinician"):
        with pytest.raises(AccessDenied):
            start_round_job(db, factories.make_user(db, role), settings, QUICK)
    assert not jobs_dir(settings).exists()  # refused before anything was written or started
    with pytest.raises(InvalidInput, match="epochs must be positive"):
        JobOptions(epochs=0)
