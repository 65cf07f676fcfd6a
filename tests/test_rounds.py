"""Fine-tuning rounds end to end with the tiny random LLaVA: snapshot, training, scoring, the record, the refusals,
reproduction from the record, the gate in front of promotion, two-person promotion and one-step rollback."""

# ruff: noqa: F811 - fixtures imported from tests/ helpers are test parameters by design

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from medvqa.config import Settings, load_settings
from medvqa.db import Adapter, AdapterStatus, AuditEvent, Dataset, TrainingRound
from medvqa.db.engine import Database
from medvqa.errors import AccessDenied, InvalidInput
from medvqa.model.adapters import LoraSettings, adapter_sha256
from medvqa.services import audit, promotion
from medvqa.services.ask import live_adapter_id, load_answering_model
from medvqa.services.audit import Actor, verify
from medvqa.services.confidence import CalibrationMismatch
from medvqa.services.round_reproduce import reproduce_round
from medvqa.services.rounds import (
    RoundOptions,
    compare_round,
    list_rounds,
    request_round_promotion,
    run_round,
)
from medvqa.training.calibration import CALIBRATION_FILE
from medvqa.training.locked_test import LockedTestSetMissing
from medvqa.training.snapshot import SnapshotRefused
from medvqa.training.train import TrainSettings
from tests import factories
from tests.model_factory import tiny_checkpoints, torch_single_thread  # noqa: F401 - pytest fixtures
from tests.round_factory import (
    cheap_passwords,  # noqa: F401 - pytest fixture
    import_image,
    record_model_answer,
    review,
    write_locked_test_set,
    write_png,
)

QUICK = RoundOptions(
    train=TrainSettings(max_steps=2, batch_size=2, learning_rate=1e-3, train_vision=False),
    lora=LoraSettings(r=2, alpha=4),
)
QUESTIONS = [("Is there a mass?", "yes", "no"), ("Which organ is this?", "lung", "liver")]


@dataclass
class Env:
    db: Database
    settings: Settings
    engineer: Actor
    admin: Actor
    reviewer: Actor
    tmp: Path
    pngs: list[Path]

    def with_settings(self, **changes) -> Settings:
        return load_settings(**(self.settings.model_dump() | changes))


@pytest.fixture
def env(db, tmp_path, tiny_checkpoints, cheap_passwords):
    """Four patients with two reviewed answers each, a locked test set of two other pictures, the tiny LLaVA."""
    pngs = [write_png(tmp_path / f"img{i}.png", i) for i in range(6)]
    locked = write_locked_test_set(tmp_path / "locked.jsonl", pngs[4:])
    settings = load_settings(
        home=tmp_path / "home",
        base_model=tiny_checkpoints("llava"),
        device="cpu",
        locked_test_set=locked,
        round_min_examples=4,
        round_validation_fraction=0.25,
    )
    clinician, reviewer = factories.make_user(db, "clinician"), factories.make_user(db, "reviewer")
    for png in pngs[:4]:
        image = import_image(db, settings, png)
        for question, said, reference in QUESTIONS:
            answer_id = record_model_answer(db, settings, clinician, image, question, said)
            review(db, reviewer, answer_id, "incorrect", reference)
    engineer, admin = factories.make_user(db, "ml_engineer"), factories.make_user(db, "admin")
    return Env(db, settings, engineer, admin, reviewer, tmp_path, pngs)


def _events(db, action):
    with db.read_session() as session:
        return session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)).all()


def test_a_round_records_what_went_in_and_came_out_and_reproduces(env):
    outcome = run_round(env.db, env.engineer, env.settings, QUICK)
    with env.db.read_session() as session:
        row = session.get(TrainingRound, outcome.round_id)
        dataset = session.get(Dataset, outcome.dataset_id)
        adapter = session.get(Adapter, outcome.adapter_id)
        assert row is not None and dataset is not None and adapter is not None
        config, environment, metrics = row.config, row.environment, row.metrics
        assert dataset.item_count == 8 and len(dataset.item_ids) == 8
        assert dataset.content_sha256 == config["snapshot"]["content_sha256"]
        assert adapter.status == AdapterStatus.CANDIDATE and adapter.round_id == row.id
        assert adapter.sha256 == adapter_sha256(Path(adapter.path)) == outcome.adapter_sha256
        assert (
            row.seed == 0
            and row.code_version.startswith("0.1.0")
            and row.base_model_ref.startswith(adapter.base_model_ref)
        )
        assert row.status == ("gate_passed" if outcome.gate_passed else "gate_failed")
    assert config["snapshot"]["splits"] == {"train": 6, "validation": 2}  # one patient of four, both questions
    assert config["train_settings"]["max_steps"] == 2 and config["lora_settings"]["r"] == 2
    assert len(config["training_data"]["sha256"]) == 64 and config["locked_test_set"]["questions"] == 4
    assert {"torch", "transformers", "peft"} <= set(environment["versions"]) and environment["source_sha256"]
    assert metrics["test"]["candidate"]["counts"]["n"] == 4 and metrics["validation"]["live"]["counts"]["n"] == 2
    rows = {(r["group"], r["subgroup"]) for r in outcome.test["rows"]}
    assert {("overall", "all"), ("answer_type", "closed"), ("question_type", "PRES"), ("organ", "CHEST")} <= rows
    assert outcome.test["mcnemar"]["n_closed"] == 2
    ran = _events(env.db, "training:round:run")
    assert ran[-1].outcome == "success" and ran[-1].details["adapter_sha256"] == outcome.adapter_sha256
    # The candidate's calibration: fitted on the round's validation split, beside the adapter, its hash recorded.
    written = Path(adapter.path) / CALIBRATION_FILE
    recorded = metrics["calibration_file"]
    assert hashlib.sha256(written.read_bytes()).hexdigest() == recorded["sha256"]
    assert adapter.metrics["calibration_file"] == recorded
    stored = json.loads(written.read_text())
    assert stored["adapter_ref"] == outcome.adapter_sha256 and stored["data"] == str(
        Path(config["snapshot"]["folder"]) / "validation.jsonl"
    )
    assert sum(kind["held_out"] for kind in stored["kinds"].values()) == 2  # too few: raw confidence, no threshold
    assert set(outcome.calibration) == {"live", "candidate"} and outcome.calibration["candidate"]
    assert metrics["test"]["candidate"]["calibration"]["closed"]["n"] == 2
    assert _events(env.db, "training:dataset:snapshot")[-1].details["content_sha256"] == dataset.content_sha256

    report = reproduce_round(env.db, env.engineer, env.settings, outcome.round_id)
    assert report["same_adapter"] and report["rerun_sha256"] == outcome.adapter_sha256, report
    assert report["same_base_model"]
    with pytest.raises(InvalidInput, match=f"reproduces adapter {outcome.adapter_id} exactly"):
        run_round(env.db, env.engineer, env.settings, QUICK)


def test_refusals_say_why_and_are_audited(env):
    with pytest.raises(AccessDenied):
        run_round(env.db, env.reviewer, env.settings, QUICK)
    with pytest.raises(LockedTestSetMissing, match="MEDVQA_LOCKED_TEST_SET"):
        run_round(env.db, env.engineer, env.with_settings(locked_test_set=None), QUICK)
    with pytest.raises(SnapshotRefused, match="at least 9"):
        run_round(env.db, env.engineer, env.with_settings(round_min_examples=9), QUICK)
    leaky = write_locked_test_set(env.tmp / "leaky.jsonl", env.pngs[3:5])
    with pytest.raises(SnapshotRefused, match=r"2 snapshot item.*locked test set"):
        run_round(env.db, env.engineer, env.with_settings(locked_test_set=leaky), QUICK)
    failed = [e for e in _events(env.db, "training:round:run") if e.outcome == "failed"]
    assert len(failed) == 3 and "locked test set" in failed[-1].details["reason"]
    with env.db.read_session() as session:
        assert session.scalars(select(TrainingRound)).first() is None


def test_gate_then_two_people_promote_and_rollback_is_one_step(env, tmp_path):
    lenient = env.with_settings(round_gate_max_overall_drop=1.0, round_gate_max_subgroup_drop=1.0)
    outcome = run_round(env.db, env.engineer, lenient, QUICK)
    assert outcome.gate_passed
    comparison = compare_round(env.db, env.admin, outcome.round_id, tmp_path / "out")
    assert comparison.chart.read_bytes().startswith(b"\x89PNG")
    assert "| overall | all | 4 |" in comparison.markdown and "Round validation split" in comparison.markdown
    listed = list_rounds(env.db, env.engineer)
    assert listed[0]["id"] == outcome.round_id and listed[0]["adapter"]["status"] == "candidate"

    request_round_promotion(env.db, env.engineer, outcome.adapter_id, "passes the gate")
    with pytest.raises(AccessDenied):  # an ML engineer cannot approve
        promotion.approve_promotion(env.db, env.engineer, outcome.adapter_id)
    promotion.approve_promotion(env.db, env.admin, outcome.adapter_id)
    assert live_adapter_id(env.db) == outcome.adapter_id  # answers from now on name this adapter
    assert "Calibration on the locked test set" in comparison.markdown
    with env.db.read_session() as session:
        calibration_file = Path(session.get(Adapter, outcome.adapter_id).path) / CALIBRATION_FILE
    original = calibration_file.read_bytes()
    calibration_file.write_bytes(original.replace(b'"threshold": null', b'"threshold": 0.0'))
    with pytest.raises(CalibrationMismatch, match="was recorded for these weights"):
        load_answering_model(env.db, env.settings)  # an edited calibration of the live adapter is refused
    calibration_file.write_bytes(original)
    assert promotion.rollback(env.db, env.admin, "bad answers reported") is None
    assert live_adapter_id(env.db) is None
    # The snapshot, the round, the adapter and each status change are records the trail vouches for.
    report = verify(env.db, strict=True)
    assert report.ok, report.reason
    with env.db.read_session() as session:
        vouched = {t for e in audit.iter_events(session) for t, _, _ in e.details.get("row_digests", [])}
    assert {"datasets", "training_rounds", "adapters", "answers", "reviews"} <= vouched


def test_a_failed_gate_blocks_the_promotion_request(env):
    with env.db.session() as session, session.begin():
        failed = {"passed": False, "reasons": ["organ CHEST: accuracy drops 5.0 points (allowed 2.0; n=40)"]}
        row = Adapter(
            name="failing",
            sha256="f" * 64,
            path=str(env.tmp),
            base_model_ref="tiny",
            metrics={"gate": failed},
            status=AdapterStatus.CANDIDATE,
        )
        session.add(row)
        session.flush()
        adapter_id = row.id
    with pytest.raises(InvalidInput, match=r"gate failed .*organ CHEST"):
        request_round_promotion(env.db, env.engineer, adapter_id, "please")
    event = _events(env.db, "model:adapter:request_promotion")[-1]
    assert event.outcome == "failed" and "CHEST" in json.dumps(event.details)
