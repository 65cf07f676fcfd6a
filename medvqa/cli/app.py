"""`medvqa workbench` and `medvqa demo`: the Streamlit workbench, and the embedded default to try it."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click

from compliance.policy import DEMO_PASSWORD
from medvqa.cli.support import open_database as _open_database
from medvqa.cli.support import operator as _operator
from medvqa.errors import MedVQAError

if TYPE_CHECKING:
    from medvqa.services.database import Database


@click.command("workbench")
@click.option("--no-browser", is_flag=True, help="Do not open a browser tab (server use).")
def workbench_command(no_browser: bool) -> None:
    """Start the Streamlit workbench on 127.0.0.1 unless STREAMLIT_SERVER_ADDRESS (or Streamlit's config file)
    names another address. Streamlit's own settings apply (STREAMLIT_SERVER_PORT, .streamlit/config.toml, ...).
    Refuses a non-loopback address while an account still has the published demo password."""
    database = _open_database()  # fail here, in one line, rather than inside the app
    _run_workbench(database, headless=no_browser)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _is_loopback(address: str) -> bool:
    import ipaddress

    if address in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _server_address() -> str | None:
    """The address Streamlit would listen on by its own settings (environment, then config files); None when
    none is set, in which case Streamlit would listen on every interface."""
    import os

    if os.environ.get("STREAMLIT_SERVER_ADDRESS"):
        return os.environ["STREAMLIT_SERVER_ADDRESS"]
    from streamlit import config as streamlit_config

    value = streamlit_config.get_option("server.address")
    return str(value) if value else None


def _run_workbench(database: Database, headless: bool) -> NoReturn:
    """Replace this process with `streamlit run workbench/server.py`: one process, so stopping it stops the app,
    and Streamlit reads its own settings (STREAMLIT_* variables, .streamlit/config.toml) as usual."""
    import os

    from medvqa.services.users import accounts_with_password
    from workbench import SERVER_PATH

    env = dict(os.environ)
    address = _server_address()
    if address is None:
        address = env["STREAMLIT_SERVER_ADDRESS"] = "127.0.0.1"  # not every interface, unless configured
    if not _is_loopback(address):
        published = accounts_with_password(database, DEMO_PASSWORD)
        if published:
            raise MedVQAError(
                f"refusing to serve on {address}: account(s) {', '.join(published)} still have the published demo "
                "password; disable them (medvqa users disable NAME) or serve on 127.0.0.1"
            )
    if headless:
        env.setdefault("STREAMLIT_SERVER_HEADLESS", "true")
    env.setdefault("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")  # nothing leaves the hospital
    env.setdefault("STREAMLIT_CLIENT_TOOLBAR_MODE", "viewer")  # no developer menu (no "Deploy") for users
    env["STREAMLIT_CLIENT_SHOW_ERROR_DETAILS"] = "none"  # never a traceback on a page: the app logs it with an id
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "streamlit", "run", str(SERVER_PATH)], env)


@click.command()
@click.option("--no-app", is_flag=True, help="Set everything up but do not start the workbench.")
@click.option("--no-browser", is_flag=True, help="Start the workbench without opening a browser tab.")
def demo(no_app: bool, no_browser: bool) -> None:
    """Set up the embedded default: SQLite under MEDVQA_HOME, one demo account per role, and the
    VQA-RAD teaching images as de-identified demo studies (MEDVQA_DEMO_DATA); then start the workbench on
    127.0.0.1 (the demo accounts share a published password, so no other address is served)."""
    from medvqa.config import load_settings
    from medvqa.services.database import database_url, upgrade_database
    from medvqa.services.users import add_user, list_users

    address = None if no_app else _server_address()
    if address is not None and not _is_loopback(address):
        raise MedVQAError(
            f"medvqa demo serves accounts with a published password, so it listens on 127.0.0.1 only, not on "
            f"{address} (unset STREAMLIT_SERVER_ADDRESS or server.address)"
        )
    settings = load_settings()
    database = _open_database(migrated=False)
    upgrade_database(database)
    existing = {row["username"] for row in list_users(database, _operator())}
    for username, role in DEMO_USERS.items():
        if username not in existing:
            add_user(database, _operator(), username, DEMO_PASSWORD, role, f"Demo {role}")
    click.echo(f"database: {database_url(database)}")
    click.echo(f"demo accounts (password {DEMO_PASSWORD!r}): " + ", ".join(f"{u} ({r})" for u, r in DEMO_USERS.items()))
    _import_demo_studies(database, settings)
    if no_app:
        return
    from medvqa.services.evaluation import base_model_path

    # Before the app, not at the first question: the first run converts SmolLM2 and folds the shipped weights.
    click.echo("preparing the answering model (the first run builds it under MEDVQA_HOME, about a minute)")
    click.echo(f"model: {base_model_path(settings)}")
    click.echo("starting the workbench (Ctrl+C stops it)")
    _run_workbench(database, headless=no_browser)


def _import_demo_studies(database: Database, settings: Any) -> None:
    from medvqa.imaging.demo import build_demo_files, multi_frame_demo_file
    from medvqa.services.studies import import_paths

    volume = multi_frame_demo_file()
    if volume is not None:  # VQA-RAD's pictures are single images: one real multi-frame series to scroll through
        report = import_paths(database, _operator(), [volume], settings)
        state = "imported" if report.count("imported") else "already there"
        click.echo(f"multi-slice demo series: {state} (a 30-frame ultrasound volume shipped with pydicom)")
    source = settings.demo_data_dir
    if not (source / "images").is_dir():
        click.echo(f"no demo studies: VQA-RAD not found at {source} (set MEDVQA_DEMO_DATA)", err=True)
        return
    files = build_demo_files(source, settings.home / "demo-dicom", settings.import_max_pixels)
    report = import_paths(database, _operator(), files, settings)
    click.echo(
        f"demo studies: {report.count('imported')} imported, {report.count('duplicate')} already there "
        f"({len(files)} VQA-RAD images)"
    )


DEMO_USERS = {  # username -> role; the demo is for trying the workbench, never for patient data
    "dr.demo": "clinician",
    "reviewer.demo": "reviewer",
    "reviewer2.demo": "reviewer",  # a second reader: double reading and Cohen's kappa can be tried
    "ml.demo": "ml_engineer",
    "auditor.demo": "auditor",
    "admin.demo": "admin",
}
