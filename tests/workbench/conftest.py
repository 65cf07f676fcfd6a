"""Fixtures for the workbench and its services: an imported CT study, the tiny LLaVA as the workbench's model,
and the environment that points the app (and the `medvqa` command) at this test's database."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from medvqa.config import Settings, load_settings
from medvqa.db import Series
from medvqa.db.engine import Database
from medvqa.services.studies import import_paths
from tests import factories
from tests.model_factory import tiny_checkpoints, torch_single_thread  # noqa: F401 - pytest fixtures
from tests.phi_factory import write_phi_series


@pytest.fixture
def app_env(cli_env: dict[str, str], tiny_checkpoints, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:  # noqa: F811
    """cli_env plus the tiny LLaVA as the workbench's base model, on the CPU."""
    extra = {"MEDVQA_BASE_MODEL": str(tiny_checkpoints("llava")), "MEDVQA_DEVICE": "cpu"}
    for key, value in extra.items():
        monkeypatch.setenv(key, value)
    return {**cli_env, **extra}


@pytest.fixture
def settings(app_env: dict[str, str]) -> Settings:
    return load_settings()


def import_ct(db: Database, settings: Settings, folder: Path, count: int = 3, modality: str = "CT") -> tuple[int, int]:
    """Import a synthetic series (with fake PHI in its tags); returns (study id, series id)."""
    paths = write_phi_series(folder, count, modality=modality, first_index=0 if modality == "CT" else 20)
    if modality != "CT":  # a study of its own
        for path in paths:
            dataset = pydicom.dcmread(path)
            dataset.StudyInstanceUID, dataset.SeriesInstanceUID = (
                f"{dataset.StudyInstanceUID}.9",
                f"{dataset.SeriesInstanceUID}.9",
            )
            dataset.save_as(path)
    report = import_paths(db, factories.OPERATOR, paths, settings)
    with db.read_session() as session:
        series = session.scalars(select(Series).where(Series.study_id == report.study_ids[0])).one()
        return series.study_id, series.id


@pytest.fixture
def ct_study(db: Database, settings: Settings, tmp_path: Path) -> tuple[int, int]:
    return import_ct(db, settings, tmp_path / "ct")
