"""Settings come from MEDVQA_* variables over an optional TOML file; a wrong value names its variable."""

from __future__ import annotations

import pytest

from medvqa.config import load_settings
from medvqa.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ("MEDVQA_DATABASE_URL", "MEDVQA_AUDIT_ANCHOR", "MEDVQA_CONFIG", "MEDVQA_SQLITE_BUSY_TIMEOUT_MS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEDVQA_HOME", str(tmp_path / "home"))


def test_defaults_put_everything_under_home(tmp_path):
    settings = load_settings()
    assert settings.home == tmp_path / "home"
    assert settings.sqlalchemy_url.render_as_string() == f"sqlite:///{tmp_path / 'home' / 'medvqa.db'}"
    assert settings.audit_anchor_path == tmp_path / "home" / "audit-anchor.log"


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgresql://db.example/medvqa", "postgresql+psycopg://db.example/medvqa"),
        ("postgresql+psycopg2://u@h/d", "postgresql+psycopg://u@h/d"),
        ("sqlite:////var/lib/medvqa/x.db", "sqlite:////var/lib/medvqa/x.db"),
    ],
)
def test_database_url_from_environment(monkeypatch, given, used):
    monkeypatch.setenv("MEDVQA_DATABASE_URL", given)
    assert load_settings().sqlalchemy_url.render_as_string() == used


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MEDVQA_DATABASE_URL", "mysql://h/d", "MEDVQA_DATABASE_URL: backend 'mysql' is not supported"),
        ("MEDVQA_DATABASE_URL", "not a url", "MEDVQA_DATABASE_URL: not a database URL"),
        ("MEDVQA_SQLITE_BUSY_TIMEOUT_MS", "soon", "MEDVQA_SQLITE_BUSY_TIMEOUT_MS: Input should be a valid integer"),
        ("MEDVQA_SQLITE_BUSY_TIMEOUT_MS", "-1", "MEDVQA_SQLITE_BUSY_TIMEOUT_MS: Input should be greater than"),
        ("MEDVQA_CONFIG", "/nonexistent/medvqa.toml", "MEDVQA_CONFIG: no such file"),
    ],
)
def test_wrong_values_give_one_line_naming_the_variable(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_file_values_apply_and_environment_wins(monkeypatch, tmp_path):
    config = tmp_path / "medvqa.toml"
    config.write_text('database_url = "sqlite:////srv/from-file.db"\nsqlite_busy_timeout_ms = 1234\n')
    monkeypatch.setenv("MEDVQA_CONFIG", str(config))
    settings = load_settings()
    assert settings.sqlalchemy_url.database == "/srv/from-file.db"
    assert settings.sqlite_busy_timeout_ms == 1234
    monkeypatch.setenv("MEDVQA_SQLITE_BUSY_TIMEOUT_MS", "99")
    assert load_settings().sqlite_busy_timeout_ms == 99


def test_unknown_key_in_file_is_named(monkeypatch, tmp_path):
    config = tmp_path / "medvqa.toml"
    config.write_text('databse_url = "sqlite:///typo.db"\n')
    monkeypatch.setenv("MEDVQA_CONFIG", str(config))
    with pytest.raises(ConfigError, match="unknown setting 'databse_url'"):
        load_settings()
