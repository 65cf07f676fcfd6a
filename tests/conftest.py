"""Shared fixtures: a fresh, migrated, real database per test.

SQLite by default. With MEDVQA_TEST_DATABASE_URL=postgresql://host/db the same tests run on
PostgreSQL: a template database is migrated once per run and each test gets a copy of it
(CREATE DATABASE ... TEMPLATE), dropped afterwards.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from compliance.audit_chain import AuditAnchor
from medvqa.config import normalize_database_url
from medvqa.db.engine import Database, build_engine
from medvqa.db.migrate import upgrade
from tests import factories
from tests import pacs_server as pacs_server_module

SERVER_URL = os.environ.get("MEDVQA_TEST_DATABASE_URL")
DB_FIXTURES = {"db", "database_url", "cli_env"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if DB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.db)


def pytest_report_header() -> str:
    return f"medvqa test database: {'PostgreSQL ' + SERVER_URL if SERVER_URL else 'SQLite'}"


def _admin_execute(server: URL, statement: str) -> None:
    engine = create_engine(server, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(statement))
    engine.dispose()


def _migrate(url: URL, anchor_dir: Path) -> None:
    database = Database(build_engine(url), AuditAnchor(anchor_dir / "template-anchor.log"))
    upgrade(database)
    database.dispose()


@pytest.fixture(scope="session")
def template_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[URL]:
    """A database migrated to head once per run; tests copy it."""
    folder = tmp_path_factory.mktemp("template")
    if SERVER_URL is None:
        url = normalize_database_url(f"sqlite:///{folder / 'template.db'}")
        _migrate(url, folder)
        yield url
        return
    server = normalize_database_url(SERVER_URL)
    name = f"medvqa_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    _admin_execute(server, f'CREATE DATABASE "{name}"')
    url = server.set(database=name)
    try:
        _migrate(url, folder)
        yield url
    finally:
        _admin_execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(template_url: URL, tmp_path: Path) -> Iterator[URL]:
    """The URL of a fresh database at head, for this test only."""
    if SERVER_URL is None:
        assert template_url.database is not None
        target = tmp_path / "medvqa.db"
        shutil.copyfile(template_url.database, target)
        yield template_url.set(database=str(target))
        return
    server = normalize_database_url(SERVER_URL)
    name = f"medvqa_t_{uuid.uuid4().hex[:12]}"
    _admin_execute(server, f'CREATE DATABASE "{name}" TEMPLATE "{template_url.database}"')
    try:
        yield server.set(database=name)
    finally:
        _admin_execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def anchor_path(tmp_path: Path) -> Path:
    path = tmp_path / "audit-anchor.log"
    path.touch()
    return path


@pytest.fixture
def db(database_url: URL, anchor_path: Path) -> Iterator[Database]:
    database = Database(build_engine(database_url), AuditAnchor(anchor_path))
    yield database
    database.dispose()


@pytest.fixture
def cli_env(database_url: URL, anchor_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment that points the `medvqa` command (in-process or a subprocess) at this test's database."""
    env = {
        "MEDVQA_HOME": str(tmp_path / "home"),
        "MEDVQA_DATABASE_URL": database_url.render_as_string(hide_password=False),
        "MEDVQA_AUDIT_ANCHOR": str(anchor_path),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **env}


@pytest.fixture
def operator() -> factories.Actor:
    return factories.OPERATOR


@pytest.fixture
def clinician(db: Database) -> factories.Actor:
    return factories.make_user(db, "clinician")


@pytest.fixture
def answer_id(db: Database, clinician: factories.Actor) -> int:
    return factories.make_answer(db, clinician)


@pytest.fixture(scope="session")
def pacs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pacs_server_module.Orthanc]:
    """A real Orthanc (DICOMweb and DIMSE) for the whole run, seeded by the tests that use it."""
    reason = pacs_server_module.missing()
    if reason:
        pytest.skip(reason)
    server = pacs_server_module.Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.remove()


@pytest.fixture
def pacs_env(
    pacs_server: pacs_server_module.Orthanc, cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """cli_env plus the settings that point medvqa at the test PACS."""
    env = pacs_server.settings_env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {**cli_env, **env}
