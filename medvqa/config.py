"""Configuration: MEDVQA_* environment variables, over an optional TOML file (MEDVQA_CONFIG), over defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from medvqa.errors import ConfigError

ENV_PREFIX = "MEDVQA_"
SUPPORTED_BACKENDS = ("sqlite", "postgresql")


class Settings(BaseSettings):
    """Every setting medvqa reads. The variable for field `x` is MEDVQA_X."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    home: Path = Field(
        default_factory=lambda: platformdirs.user_data_path("medvqa"),
        description="Data folder: the SQLite database, stored studies, adapters, the audit anchor.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL (sqlite:///... or postgresql://...); default: SQLite file in MEDVQA_HOME.",
    )
    audit_anchor: Path | None = Field(
        default=None,
        description="Append-only file holding the audit chain heads outside the database; "
        "default: MEDVQA_HOME/audit-anchor.log. Put it on storage the database admins cannot rewrite.",
    )
    audit_anchor_key_file: Path | None = Field(
        default=None,
        description="HMAC key(s) that authenticate the anchor's lines (created 0600 with the anchor); default: "
        "the anchor's path + '.key'. Readable by the application's account only; the database never holds it.",
    )
    sqlite_busy_timeout_ms: int = Field(
        default=30_000, ge=0, description="How long a SQLite writer waits for the write lock."
    )
    write_retries: int = Field(
        default=8,
        ge=0,
        description="Retries of a write after a serialization failure, deadlock or lock timeout.",
    )

    deid_key_file: Path | None = Field(
        default=None,
        description="Secret for keyed UIDs and pseudonyms (created on first import); default MEDVQA_HOME/deid.key.",
    )
    deid_retain_longitudinal_dates: bool = Field(
        default=False,
        description="PS3.15 option: shift dates by a fixed offset per patient instead of removing them.",
    )
    import_max_file_bytes: int = Field(default=1 << 30, gt=0, description="Largest file (or zip member) imported.")
    import_max_pixels: int = Field(
        default=300_000_000, gt=0, description="Most samples (rows x columns x frames x samples) in one instance."
    )
    import_max_instances: int = Field(default=20_000, gt=0, description="Most files in one import.")
    import_workers: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Worker processes that prepare an import's files in parallel (1: in the importing process); "
        "default: one per CPU core, at most 8.",
    )

    base_model: Path | None = Field(
        default=None,
        description="Local image-text-to-text checkpoint the workbench answers with; default: the built-in "
        "default model under MEDVQA_HOME/models (built from SmolLM2 on first use).",
    )
    device: str = Field(default="auto", description="auto (CUDA with bfloat16 when present), cpu, or cuda[:N].")
    workbench_idle_timeout_minutes: int = Field(
        default=15,
        ge=1,
        le=24 * 60,
        description="Minutes without interaction after which the workbench signs a user out (checked on the server).",
    )
    workbench_session_max_hours: float = Field(
        default=12,
        gt=0,
        le=7 * 24,
        description="Absolute lifetime of a workbench session: signed out this long after signing in, active or not.",
    )
    sign_in_max_failures: int = Field(
        default=5,
        ge=1,
        le=100,
        description="Failed sign-ins of one account name within the window that lock it for the lockout time.",
    )
    sign_in_source_max_failures: int = Field(
        default=20,
        ge=1,
        le=1000,
        description="Failed sign-ins from one source address within the window that block that address.",
    )
    sign_in_window_minutes: int = Field(
        default=15, ge=1, le=24 * 60, description="The window in which failed sign-ins are counted."
    )
    sign_in_lockout_minutes: int = Field(
        default=15, ge=1, le=24 * 60, description="How long a locked account (or blocked address) stays refused."
    )
    demo_data: Path | None = Field(
        default=None,
        description="VQA-RAD folder for `medvqa demo`; default: shared/data/vqa-rad beside the checkout.",
    )
    locked_test_set: Path | None = Field(
        default=None,
        description="VQA jsonl every fine-tuning round is scored on (never trained on); rounds refuse to run "
        "without it. Rows may carry `patient` (pseudonym) for the leak check; else image pixel hashes stand in.",
    )
    round_min_examples: int = Field(
        default=50, ge=1, description="A round refuses to run on a snapshot with fewer reviewed examples."
    )
    round_validation_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Share of a snapshot's patients held out as the round's validation."
    )
    round_base_data: Path | None = Field(
        default=None, description="Optional VQA jsonl mixed into every round's training data (e.g. VQA-RAD train)."
    )
    round_gate_max_overall_drop: float = Field(
        default=0.0, ge=0, le=1, description="Gate: most the overall test accuracy may drop (fraction; 0 = none)."
    )
    round_gate_max_subgroup_drop: float = Field(
        default=0.02, ge=0, le=1, description="Gate: most any question type, organ, closed or open may drop."
    )
    round_gate_min_subgroup_questions: int = Field(
        default=10, ge=1, description="Gate: subgroups with fewer test questions are reported, not gated."
    )
    eval_batch_size: int = Field(
        default=16,
        ge=1,
        le=256,
        description="Questions answered per generate call when scoring (eval, calibrate, rounds): batched greedy "
        "decoding gives the answers one at a time gives, faster. 1 scores one at a time.",
    )
    abstain_precision_closed: float = Field(
        default=0.85,
        gt=0,
        le=1,
        description="Abstention: the precision a calibration's threshold must reach on held-out closed (yes/no) "
        "answers; below the threshold an answer is not presented as one.",
    )
    abstain_precision_open: float = Field(
        default=0.5, gt=0, le=1, description="Abstention: the same precision target for open answers."
    )
    model_backend: str = Field(
        default="transformers",
        pattern=r"^(transformers|vllm)$",
        description="How the workbench and `medvqa ask` answer: transformers (in process) or vllm (a vLLM server).",
    )
    vllm_url: str = Field(
        default="http://127.0.0.1:8000",
        pattern=r"^https?://\S+$",
        description="Root URL of the vLLM OpenAI-compatible server (model_backend = vllm); see docs/gpu.md.",
    )
    vllm_model: str = Field(
        default="medvqa-base", min_length=1, description="The base model's name on that server (--served-model-name)."
    )
    vllm_model_ref: str | None = Field(
        default=None,
        description="The served base weights as medvqa names them ('<folder>@<sha12>'), recorded with each answer "
        "and checked against the live adapter's base; default 'vllm:<vllm_model>'.",
    )
    vllm_timeout_s: float = Field(default=60.0, gt=0, le=600, description="Seconds to wait for the vLLM server.")
    vllm_system_role: bool = Field(
        default=True, description="False for chat templates without a system turn: instructions open the user turn."
    )

    dicomweb_url: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        description="The PACS's DICOMweb root (QIDO-RS and WADO-RS), e.g. http://pacs:8042/dicom-web.",
    )
    dicomweb_username: str | None = Field(
        default=None, description="Basic authentication user for the PACS (its password from the password file)."
    )
    dicomweb_password: SecretStr | None = Field(
        default=None, description="Basic authentication password (prefer the password file)."
    )
    dicomweb_password_file: Path | None = Field(
        default=None, description="File whose first line is the basic-authentication password (never on argv)."
    )
    dicomweb_token: SecretStr | None = Field(default=None, description="Bearer token for the PACS (or the token file).")
    dicomweb_token_file: Path | None = Field(
        default=None, description="File whose first line is a bearer token for the PACS (instead of basic auth)."
    )
    dicomweb_ca_bundle: Path | None = Field(
        default=None, description="CA certificates (PEM) that sign the PACS's TLS certificate; default: system CAs."
    )
    dicomweb_verify_tls: bool = Field(
        default=True, description="Verify the PACS's TLS certificate. Turn off only for a test PACS."
    )
    dicomweb_timeout_s: float = Field(default=30.0, gt=0, le=600, description="Seconds to wait for the PACS.")
    dicomweb_retries: int = Field(
        default=3, ge=0, le=10, description="Retries (with backoff) after a connection error or a 429/5xx answer."
    )
    dimse_pacs: str | None = Field(
        default=None,
        pattern=r"^[^@\\\s]{1,16}@[\w.\-\[\]:]+:\d{1,5}$",
        description="A PACS reached over DIMSE (C-FIND, C-GET): 'AE_TITLE@host:port'.",
    )
    dimse_ae_title: str = Field(
        default="MEDVQA", pattern=r"^[^\\\s]{1,16}$", description="medvqa's own AE title (listener and client)."
    )
    dimse_timeout_s: float = Field(default=30.0, gt=0, le=600, description="Seconds to wait on a DIMSE peer.")
    listen_port: int = Field(default=11112, ge=1, le=65535, description="Port of `medvqa listen` (C-STORE SCP).")
    listen_address: str = Field(
        default="127.0.0.1", min_length=1, description="Address `medvqa listen` binds (0.0.0.0: every interface)."
    )
    listen_calling_aes: str = Field(
        default="",
        description="Calling AE titles that may send to `medvqa listen`, comma-separated, each optionally "
        "'AE@host'; none by default (every association is rejected and audited).",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(f"{ENV_PREFIX}CONFIG")
        if config_file:
            if not Path(config_file).is_file():
                raise ConfigError(f"{ENV_PREFIX}CONFIG: no such file: {config_file}")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        normalize_database_url(value)
        return value

    @property
    def sqlalchemy_url(self) -> URL:
        """The database URL to connect to, with the psycopg 3 driver for PostgreSQL."""
        if self.database_url:
            return normalize_database_url(self.database_url)
        return make_url(f"sqlite:///{self.home / 'medvqa.db'}")

    @property
    def audit_anchor_path(self) -> Path:
        return self.audit_anchor or self.home / "audit-anchor.log"

    @property
    def audit_anchor_key_path(self) -> Path:
        anchor = self.audit_anchor_path
        return self.audit_anchor_key_file or anchor.with_name(anchor.name + ".key")

    @property
    def deid_key_path(self) -> Path:
        return self.deid_key_file or self.home / "deid.key"

    @property
    def demo_data_dir(self) -> Path:
        return self.demo_data or Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad"

    @property
    def import_workers_count(self) -> int:
        if self.import_workers is not None:
            return self.import_workers
        return max(1, min(os.cpu_count() or 1, 8))

    @property
    def store_dir(self) -> Path:
        """De-identified instances, content-addressed."""
        return self.home / "store"


def normalize_database_url(value: str) -> URL:
    """Parse a database URL; refuse backends medvqa does not support; default PostgreSQL to psycopg 3."""
    try:
        url = make_url(value)
    except ArgumentError as exc:
        raise ValueError(f"not a database URL: {exc}") from None
    if url.get_backend_name() not in SUPPORTED_BACKENDS:
        raise ValueError(f"backend {url.get_backend_name()!r} is not supported; use sqlite or postgresql")
    if url.drivername in ("postgresql", "postgresql+psycopg2"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def load_settings(**overrides: Any) -> Settings:
    """Read the settings; a wrong value becomes one ConfigError line naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        message = str(first["msg"]).removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"unknown setting {field!r} in {ENV_PREFIX}CONFIG file") from None
        raise ConfigError(f"{ENV_PREFIX}{field.upper()}: {message}") from None
