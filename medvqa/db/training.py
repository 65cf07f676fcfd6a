"""Dataset snapshots, fine-tuning rounds, and the adapters they produce."""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import JSON, Enum, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from medvqa.db.base import Base, IntPK, JsonDict, Name, OptionalTimestamp, Sha256, Timestamp


class AdapterStatus(enum.StrEnum):
    CANDIDATE = "candidate"
    LIVE = "live"
    RETIRED = "retired"


class Dataset(Base):
    """A frozen snapshot of accepted feedback: the item ids and a hash over their content."""

    __tablename__ = "datasets"

    id: Mapped[IntPK]
    name: Mapped[Name] = mapped_column(unique=True)
    item_ids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    item_count: Mapped[int] = mapped_column(Integer)
    content_sha256: Mapped[Sha256]
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[Timestamp]


class TrainingRound(Base):
    """One fine-tuning round: what went in (data, config, code, environment) and what came out."""

    __tablename__ = "training_rounds"

    id: Mapped[IntPK]
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)
    base_model_ref: Mapped[str] = mapped_column(String(160))
    config: Mapped[JsonDict]
    seed: Mapped[int] = mapped_column(Integer)
    code_version: Mapped[str] = mapped_column(String(64))
    environment: Mapped[JsonDict]
    status: Mapped[str] = mapped_column(String(16))
    metrics: Mapped[JsonDict]
    requested_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    started_at: Mapped[Timestamp]
    finished_at: Mapped[OptionalTimestamp]


class Adapter(Base):
    """A PEFT adapter folder identified by the SHA-256 of its weights."""

    __tablename__ = "adapters"

    id: Mapped[IntPK]
    name: Mapped[Name] = mapped_column(unique=True)
    sha256: Mapped[Sha256] = mapped_column(unique=True)
    path: Mapped[str] = mapped_column(String(512))
    base_model_ref: Mapped[str] = mapped_column(String(160))
    round_id: Mapped[int | None] = mapped_column(ForeignKey("training_rounds.id"))
    metrics: Mapped[JsonDict]
    status: Mapped[AdapterStatus] = mapped_column(
        Enum(
            AdapterStatus,
            name="adapter_status",
            native_enum=False,
            create_constraint=True,
            length=16,
            values_callable=lambda members: [m.value for m in members],
        )
    )
    created_at: Mapped[Timestamp]
    promoted_at: Mapped[OptionalTimestamp]


class ModelValidation(Base):
    """An administrator's signed statement that a model (base weights and adapter) is validated for clinical use
    within the stated scope. Tied to the weights: another adapter or base is not covered. Revoking keeps the row
    (who, when, why), so the record of what was validated stays."""

    __tablename__ = "model_validations"

    id: Mapped[IntPK]
    model_weights: Mapped[str] = mapped_column(String(64))  # the weights part of the model_ref ("<folder>@<sha12>")
    adapter_sha256: Mapped[str | None] = mapped_column(String(64))  # None: the base model without an adapter
    name: Mapped[str] = mapped_column(String(200))  # what was validated, as shown in the banner
    statement: Mapped[str] = mapped_column(Text)  # the scope and evidence, in the administrator's words
    signed_by: Mapped[int] = mapped_column(ForeignKey("users.id"))
    signer_name: Mapped[str] = mapped_column(String(200))
    signature_meaning: Mapped[str] = mapped_column(String(200))
    signed_at: Mapped[Timestamp]
    revoked_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    revoked_at: Mapped[OptionalTimestamp]
    revoke_reason: Mapped[str | None] = mapped_column(Text)
