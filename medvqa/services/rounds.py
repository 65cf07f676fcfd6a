"""Fine-tuning rounds: reviewed feedback -> snapshot -> LoRA adapter -> scored beside the live adapter on the
locked test set and the round's validation split -> a candidate, recorded with everything needed to rerun it.

A round writes its rows (dataset, round, candidate adapter) and audit events in one transaction at the end; a
refused or failed round writes one `failed` audit event saying why. Promotion itself is the two-person service
in `promotion.py`; `request_round_promotion` adds the gate check in front of it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from compliance.policy import Action
from medvqa.config import Settings
from medvqa.db import Adapter, AdapterStatus, Dataset, TrainingRound
from medvqa.db.base import utcnow
from medvqa.db.engine import Database
from medvqa.errors import InvalidInput, MedVQAError, NotFound
from medvqa.hashing import file_sha256
from medvqa.imaging.store import ContentStore
from medvqa.model.adapters import LoraSettings
from medvqa.services import audit, promotion
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.calibration import calibration_from_report
from medvqa.services.calibration import summary as calibration_summary
from medvqa.services.confidence import RECORDED_KEY, calibration_for, recalibrated
from medvqa.services.evaluation import base_model_path, recorded_calibration
from medvqa.services.transaction import write
from medvqa.training.calibration import LoadedCalibration
from medvqa.training.compare import Comparison, GateSettings, compare_reports, comparison_markdown, write_chart
from medvqa.training.data import VQAExample, load_vqa_jsonl
from medvqa.training.locked_test import LockedTestSet, load_locked_test_set
from medvqa.training.metrics import EvalReport
from medvqa.training.provenance import code_version, environment, mixed_training_file
from medvqa.training.snapshot import Snapshot, check_no_leak, freeze_snapshot
from medvqa.training.train import TrainSettings, train_adapter

GATE_PASSED, GATE_FAILED = "gate_passed", "gate_failed"


@dataclass(frozen=True)
class RoundOptions:
    """What an ML engineer chooses for one round; the rest comes from the settings (MEDVQA_ROUND_*)."""

    since_round: int | None = None  # only decisions made after that round froze its snapshot
    train: TrainSettings = field(default_factory=TrainSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    base_model: Path | None = None  # default: the workbench's base model


@dataclass(frozen=True)
class RoundOutcome:
    round_id: int
    dataset_id: int
    adapter_id: int
    adapter_sha256: str
    gate_passed: bool
    gate_reasons: tuple[str, ...]
    test: dict[str, Any]  # comparison on the locked test set
    validation: dict[str, Any]  # comparison on the round's validation split
    calibration: dict[str, Any] = field(default_factory=dict)  # locked test set, live and candidate (calibrated)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gate_reasons": list(self.gate_reasons)}


def run_round(
    db: Database, actor: Actor, settings: Settings, options: RoundOptions, *, progress: bool = False
) -> RoundOutcome:
    """Run one round; a refusal (no locked test set, too small, leak) or failure is audited and raised."""
    authorize(db, actor, Action.ROUND_RUN, "round")
    try:
        return _run(db, actor, settings, options, progress)
    except MedVQAError as exc:
        details = {"reason": str(exc), "since_round": options.since_round}
        write(db, lambda s: audit.record(s, actor, Action.ROUND_RUN, "round", None, outcome="failed", details=details))
        raise


def _run(db: Database, actor: Actor, settings: Settings, options: RoundOptions, progress: bool) -> RoundOutcome:
    locked = load_locked_test_set(settings.locked_test_set)
    started = utcnow()
    with db.read_session() as session:
        since = _since(session, options.since_round)
        snapshot = freeze_snapshot(
            session,
            ContentStore(settings.store_dir),
            settings.home / "datasets",
            validation_fraction=settings.round_validation_fraction,
            min_examples=settings.round_min_examples,
            since=since,
        )
        live = session.scalars(select(Adapter).where(Adapter.status == AdapterStatus.LIVE)).first()
        live_adapter = (live.id, live.sha256, Path(live.path)) if live else None
    check_no_leak(snapshot, locked)
    base = options.base_model or base_model_path(settings)
    data = mixed_training_file(snapshot.train_file, settings.round_base_data, settings.home / "datasets" / "mixed")
    adapter_dir, result = _train(db, base, data, settings.home / "adapters", options, progress)
    validation = load_vqa_jsonl(snapshot.validation_file)
    sets = {"test": locked.examples, "validation": validation}
    candidate = score_adapter(base, adapter_dir, sets, settings.device, settings.eval_batch_size)
    # The candidate's calibration is fitted on its validation answers (raw), never on the locked test set.
    fitted = calibration_from_report(
        candidate["validation"], settings, candidate["test"].model_ref, result.adapter_sha256, snapshot.validation_file
    )
    path, sha256 = fitted.save(adapter_dir)
    calibration = LoadedCalibration(fitted, path, sha256)
    candidate = {name: recalibrated(report, calibration) for name, report in candidate.items()}
    live_dir = live_adapter[2] if live_adapter else None
    current = score_adapter(base, live_dir, sets, settings.device, settings.eval_batch_size)
    live_calibration = calibration_for(
        base,
        live_dir,
        model_ref=current["test"].model_ref,
        adapter_ref=current["test"].adapter_ref,
        recorded_sha256=recorded_calibration(db, live_adapter[0] if live_adapter else None),
    )
    current = {name: recalibrated(report, live_calibration) for name, report in current.items()}
    gate = GateSettings.from_settings(settings)
    comparisons = {name: compare_reports(candidate[name], current[name], gate) for name in sets}
    config = _config(options, base, snapshot, settings, data, locked, gate, live_adapter, since)
    metrics = _metrics(candidate, current, comparisons, result.as_dict())
    metrics[RECORDED_KEY] = calibration_summary(fitted, sha256)
    record = RoundRecord(snapshot, started, config, metrics, adapter_dir, result.adapter_sha256, candidate["test"])
    return _save(db, actor, settings, options, record)


def _since(session: Session, round_id: int | None) -> Any:
    if round_id is None:
        return None
    earlier = session.get(TrainingRound, round_id)
    if earlier is None:
        raise NotFound(f"round {round_id} does not exist")
    return earlier.started_at


def _train(db: Database, base: Path, data: Path, root: Path, options: RoundOptions, progress: bool) -> tuple[Path, Any]:
    """Train into a scratch folder, then move it to root/<adapter sha256>; refuse an adapter already recorded."""
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".round-", dir=root))
    try:
        result = train_adapter(base, data, scratch, options.lora, options.train, progress=progress)
        with db.read_session() as session:
            twin = session.scalars(select(Adapter.id).where(Adapter.sha256 == result.adapter_sha256)).first()
        if twin is not None:
            raise InvalidInput(
                f"this round reproduces adapter {twin} exactly (same data, settings and seed); nothing new to record"
            )
        target = root / result.adapter_sha256
        if target.exists():  # left by a round that failed after training: the same bytes
            shutil.rmtree(target)
        os.replace(scratch, target)
        return target, result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def score_adapter(
    base: Path, adapter: Path | None, sets: dict[str, list[VQAExample]], device: str, batch_size: int = 8
) -> dict[str, EvalReport]:
    """Answer every question of each set greedily with `base` (+ `adapter`; None: the bare base), `batch_size`
    per generate call, and score it, keeping each answer's raw confidence (`recalibrated` applies a calibration
    afterwards)."""
    from medvqa.model.adapters import load_adapter
    from medvqa.model.loading import load_vlm
    from medvqa.services.evaluation import EvaluatedModel, calibrated_predictor
    from medvqa.training.evaluate import evaluate

    loaded = load_vlm(base, device=device)
    if adapter is not None:
        loaded = load_adapter(loaded, adapter)
    predict = calibrated_predictor(EvaluatedModel(loaded, base, adapter, None, None), batch_size)
    return {
        name: evaluate(examples, predict).with_provenance(
            model_ref=loaded.model_ref, adapter_ref=loaded.adapter_ref, data=name
        )
        for name, examples in sets.items()
    }


@dataclass(frozen=True)
class RoundRecord:
    """What `_save` writes: the frozen snapshot and everything the round measured and used."""

    snapshot: Snapshot
    started: Any
    config: dict[str, Any]
    metrics: dict[str, Any]
    adapter_dir: Path
    adapter_sha256: str
    candidate_test: EvalReport


def _config(
    options: RoundOptions,
    base: Path,
    snapshot: Snapshot,
    settings: Settings,
    data: Path,
    locked: LockedTestSet,
    gate: GateSettings,
    live: tuple[int, str, Path] | None,
    since: Any,
) -> dict[str, Any]:
    """Everything a rerun needs (and an auditor asks about), as JSON."""
    base_data = settings.round_base_data
    return {
        "since_round": options.since_round,
        "since": since.isoformat() if since else None,
        "base_model": str(base),
        "train_settings": asdict(options.train),
        "lora_settings": asdict(options.lora),
        "snapshot": {
            "content_sha256": snapshot.content_sha256,
            "folder": str(snapshot.folder),
            "splits": snapshot.split_counts(),
            "validation_fraction": settings.round_validation_fraction,
            "left_out": snapshot.left_out,
        },
        "training_data": {
            "file": str(data),
            "sha256": file_sha256(data),
            "base_data": {"file": str(base_data), "sha256": file_sha256(base_data)} if base_data else None,
        },
        "locked_test_set": {
            "file": str(locked.path),
            "sha256": locked.sha256,
            "questions": len(locked.examples),
            "leak_check": "patients and image pixel hashes" if locked.patients else "image pixel hashes",
        },
        "gate": asdict(gate),
        "live_adapter": {"id": live[0], "sha256": live[1]} if live else None,
    }


def _metrics(
    candidate: dict[str, EvalReport],
    current: dict[str, EvalReport],
    comparisons: dict[str, Comparison],
    training: dict[str, Any],
) -> dict[str, Any]:
    gate = comparisons["test"].gate  # the locked test set decides; validation is shown beside it
    metrics: dict[str, Any] = {
        name: {"candidate": candidate[name].to_json(), "live": current[name].to_json(), "comparison": cmp.to_json()}
        for name, cmp in comparisons.items()
    }
    return metrics | {"gate": {"passed": gate.passed, "reasons": list(gate.reasons)}, "training": training}


def _save(db: Database, actor: Actor, settings: Settings, options: RoundOptions, record: RoundRecord) -> RoundOutcome:
    """The dataset (reused when the same snapshot was recorded before), the round and the candidate adapter,
    with their audit events, in one transaction."""
    gate = record.metrics["gate"]
    snapshot = record.snapshot

    def work(session: Session) -> RoundOutcome:
        dataset = session.scalars(select(Dataset).where(Dataset.content_sha256 == snapshot.content_sha256)).first()
        if dataset is None:
            dataset = Dataset(
                name=f"snapshot-{snapshot.content_sha256[:16]}",
                item_ids=snapshot.answer_ids,
                item_count=len(snapshot.items),
                content_sha256=snapshot.content_sha256,
                created_by=actor.user_id,
            )
            session.add(dataset)
            session.flush()
            details = {
                "content_sha256": snapshot.content_sha256,
                "items": len(snapshot.items),
                **snapshot.split_counts(),
            }
            audit.record(session, actor, Action.DATASET_SNAPSHOT, "dataset", dataset.id, details=details)
        model_ref = str(record.candidate_test.model_ref)
        row = TrainingRound(
            dataset_id=dataset.id,
            base_model_ref=model_ref,
            config=record.config,
            seed=options.train.seed,
            code_version=code_version(),
            environment=environment(settings.device),
            status=GATE_PASSED if gate["passed"] else GATE_FAILED,
            metrics=record.metrics,
            requested_by=actor.user_id,
            started_at=record.started,
            finished_at=utcnow(),
        )
        session.add(row)
        session.flush()
        adapter = Adapter(
            name=f"round-{row.id}-{record.adapter_sha256[:12]}",
            sha256=record.adapter_sha256,
            path=str(record.adapter_dir),
            base_model_ref=model_ref,
            round_id=row.id,
            metrics=record.candidate_test.to_json() | {"gate": gate, RECORDED_KEY: record.metrics[RECORDED_KEY]},
            status=AdapterStatus.CANDIDATE,
        )
        session.add(adapter)
        session.flush()
        details = {"dataset_id": dataset.id, "adapter_id": adapter.id, "adapter_sha256": adapter.sha256}
        details |= {"gate_passed": gate["passed"], "code_version": row.code_version, "seed": row.seed}
        audit.record(session, actor, Action.ROUND_RUN, "round", row.id, details=details)
        return RoundOutcome(
            row.id,
            dataset.id,
            adapter.id,
            adapter.sha256,
            gate["passed"],
            tuple(gate["reasons"]),
            record.metrics["test"]["comparison"],
            record.metrics["validation"]["comparison"],
            calibration_brief(record.metrics["test"]),
        )

    return write(db, work)


CALIBRATION_FIGURES = ("n", "accuracy", "mean_confidence", "ece", "brier", "aurc")


def calibration_brief(test: dict[str, Any]) -> dict[str, Any]:
    """Per side (live, candidate) and kind (closed, open): the headline calibration figures on the locked test set,
    and the share of answers presented (not abstained) with their accuracy."""
    brief: dict[str, Any] = {}
    for side in ("live", "candidate"):
        figures = test.get(side, {}).get("calibration") or {}
        brief[side] = {
            kind: {key: figures[kind][key] for key in CALIBRATION_FIGURES}
            | {"presented": figures[kind + "_abstention"]}
            for kind in ("closed", "open")
            if figures.get(kind)
        }
    return brief


def calibration_markdown(test: dict[str, Any]) -> str:
    """The gate's calibration table: live and candidate side by side on the locked test set."""
    lines = [
        "### Calibration on the locked test set (each side with its own calibration)",
        "",
        "| side | kind | n | accuracy | mean confidence | ECE | Brier | AURC | presented | presented accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side, kinds in calibration_brief(test).items():
        for kind, data in kinds.items():
            shown = data["presented"]
            coverage = "-" if shown["coverage"] is None else f"{100 * shown['coverage']:.1f}%"
            accuracy = "-" if shown["accuracy"] is None else f"{100 * shown['accuracy']:.1f}%"
            lines.append(
                f"| {side} | {kind} | {data['n']} | {100 * data['accuracy']:.1f}% | {data['mean_confidence']:.3f} "
                f"| {data['ece']:.3f} | {data['brier']:.3f} | {data['aurc']:.3f} | {coverage} | {accuracy} |"
            )
    return "\n".join(lines) + "\n"


def list_rounds(db: Database, actor: Actor) -> list[dict[str, Any]]:
    """Every round, newest first: its snapshot, candidate adapter (and its status now), gate and overall delta."""
    authorize(db, actor, Action.ADAPTER_READ, "round")
    with db.read_session() as session:
        rows = session.execute(
            select(TrainingRound, Dataset, Adapter)
            .join(Dataset, Dataset.id == TrainingRound.dataset_id)
            .outerjoin(Adapter, Adapter.round_id == TrainingRound.id)
            .order_by(TrainingRound.id.desc())
        ).all()
        return [_summary(r, d, a) for r, d, a in rows]


def _summary(row: TrainingRound, dataset: Dataset, adapter: Adapter | None) -> dict[str, Any]:
    overall = row.metrics.get("test", {}).get("comparison", {}).get("rows", [{}])[0]
    return {
        "id": row.id,
        "status": row.status,
        "started_at": row.started_at.isoformat(),
        "dataset": {"id": dataset.id, "items": dataset.item_count, "content_sha256": dataset.content_sha256},
        "adapter": {"id": adapter.id, "sha256": adapter.sha256, "status": adapter.status.value} if adapter else None,
        "gate": row.metrics.get("gate", {}),
        "test_overall": {k: overall.get(k) for k in ("live", "candidate", "delta", "ci_low", "ci_high")},
        "seed": row.seed,
        "code_version": row.code_version,
    }


@dataclass(frozen=True)
class RoundComparison:
    round_id: int
    markdown: str
    chart: Path
    data: dict[str, Any]  # {"test": comparison, "validation": comparison, "gate": ...}


def compare_round(db: Database, actor: Actor, round_id: int, out_dir: Path) -> RoundComparison:
    """The round's candidate against the adapter that was live when it ran: a markdown table per test set and a
    PNG chart of the locked test set comparison (written to out_dir/round-<id>.png)."""
    authorize(db, actor, Action.ADAPTER_READ, "round", round_id)
    with db.read_session() as session:
        row = session.get(TrainingRound, round_id)
        if row is None:
            raise NotFound(f"round {round_id} does not exist")
        metrics, config = row.metrics, row.config
    live = config.get("live_adapter")
    against = f"live adapter {live['id']}" if live else "the base model (no adapter was live)"
    sections = [f"## Round {round_id}: candidate against {against}", ""]
    for name, label in (("test", "Locked test set"), ("validation", "Round validation split (by patient)")):
        sections.append(comparison_markdown(metrics[name]["comparison"], label))
    sections.append(calibration_markdown(metrics["test"]))
    chart = write_chart(metrics["test"]["comparison"], out_dir / f"round-{round_id}.png")
    data = {name: metrics[name]["comparison"] for name in ("test", "validation")} | {"gate": metrics["gate"]}
    return RoundComparison(round_id, "\n".join(sections), chart, data)


def request_round_promotion(db: Database, actor: Actor, adapter_id: int, reason: str) -> None:
    """Ask for a candidate to go live; `promotion.request_promotion` applies the round's gate, an admin approves."""
    promotion.request_promotion(db, actor, adapter_id, reason)
