"""Rerun a recorded round's training from its record and check that it gives the same adapter.

On the same machine (same libraries, CPU) training is seeded end to end, so the SHA-256 of the adapter weights
must come out the same; the check is audited, and a mismatch names what differs in the environment.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import select

from compliance.policy import Action
from medvqa.config import Settings
from medvqa.db import Adapter, TrainingRound
from medvqa.db.engine import Database
from medvqa.errors import InvalidInput, NotFound
from medvqa.hashing import file_sha256
from medvqa.model.adapters import LoraSettings
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.transaction import write
from medvqa.training.provenance import environment
from medvqa.training.snapshot import MANIFEST
from medvqa.training.train import TRAIN_RECORD, TrainSettings, train_adapter


def reproduce_round(
    db: Database, actor: Actor, settings: Settings, round_id: int, *, progress: bool = False
) -> dict[str, Any]:
    """Train again from the round's frozen data and recorded settings; compare the adapter hash with the record."""
    authorize(db, actor, Action.ROUND_RUN, "round", round_id)
    with db.read_session() as session:
        row = session.get(TrainingRound, round_id)
        if row is None:
            raise NotFound(f"round {round_id} does not exist")
        recorded = session.scalars(select(Adapter.sha256).where(Adapter.round_id == round_id)).first()
        config, recorded_env, model_ref = row.config, row.environment, row.base_model_ref
    data = _frozen_data(config)
    train = TrainSettings(**config["train_settings"])
    lora = LoraSettings(**config["lora_settings"])
    with tempfile.TemporaryDirectory(prefix="medvqa-reproduce-") as scratch:
        result = train_adapter(Path(config["base_model"]), data, Path(scratch), lora, train, progress=progress)
        rerun_ref = json.loads((Path(scratch) / TRAIN_RECORD).read_text())["base_model_ref"]
    now = environment(settings.device)
    differences = {
        key: {"recorded": recorded_env.get(key), "now": now.get(key)}
        for key in ("versions", "machine", "cuda", "device", "source_sha256")
        if recorded_env.get(key) != now.get(key)
    }
    report = {
        "round": round_id,
        "recorded_sha256": recorded,
        "rerun_sha256": result.adapter_sha256,
        "same_adapter": result.adapter_sha256 == recorded,
        "same_base_model": rerun_ref == model_ref,
        "environment_differences": differences,
    }
    details = {k: report[k] for k in ("recorded_sha256", "rerun_sha256", "same_adapter")} | {"reproduction": True}
    outcome = "success" if report["same_adapter"] else "failed"
    write(db, lambda s: audit.record(s, actor, Action.ROUND_RUN, "round", round_id, outcome=outcome, details=details))
    return report


def _frozen_data(config: dict[str, Any]) -> Path:
    """The recorded training file, checked against its recorded hash (and the snapshot folder against its own)."""
    snapshot = Path(config["snapshot"]["folder"])
    manifest = snapshot / MANIFEST
    if not manifest.is_file():
        raise NotFound(f"the round's snapshot folder {snapshot} is gone; it cannot be rerun")
    if json.loads(manifest.read_text())["content_sha256"] != config["snapshot"]["content_sha256"]:
        raise InvalidInput(f"the snapshot in {snapshot} no longer matches the round's record")
    data = Path(config["training_data"]["file"])
    if not data.is_file() or file_sha256(data) != config["training_data"]["sha256"]:
        raise InvalidInput(f"the round's training data {data} is missing or changed since the round ran")
    return data
