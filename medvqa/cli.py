"""The `medvqa` command: the same services as the workbench, for operators and scripts.

Heavy libraries are imported inside commands so that `medvqa --help` stays fast. Expected failures
print one line (`medvqa: error: ...`) and exit non-zero; `--json` prints machine-readable output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from medvqa.cli_support import OneLineErrorGroup, training_options
from medvqa.cli_support import emit as _emit
from medvqa.cli_support import json_option as _json_option
from medvqa.cli_support import open_database as _open_database
from medvqa.cli_support import operator as _operator
from medvqa.cli_support import signed_in as _signed_in
from medvqa.errors import MedVQAError

if TYPE_CHECKING:
    from medvqa.db.engine import Database
    from medvqa.model.adapters import LoraSettings
    from medvqa.training.train import TrainSettings

DEMO_PASSWORD = "medvqa-demo-password"
DEMO_USERS = {  # username -> role; the demo is for trying the workbench, never for patient data
    "dr.demo": "clinician",
    "reviewer.demo": "reviewer",
    "ml.demo": "ml_engineer",
    "auditor.demo": "auditor",
    "admin.demo": "admin",
}


@click.group(name="medvqa", cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medvqa")
def main() -> None:
    """Medical visual question answering: DICOM studies, a LoRA-tuned vision-language model,
    reviewed feedback, and an audited database.

    Configuration comes from MEDVQA_* environment variables (MEDVQA_HOME, MEDVQA_DATABASE_URL, ...)
    and an optional TOML file named by MEDVQA_CONFIG.
    """


@main.group()
def db() -> None:
    """Create and migrate the database."""


@db.command("upgrade")
@_json_option
def db_upgrade(as_json: bool) -> None:
    """Create the database or migrate it to the schema this code expects (MEDVQA_DATABASE_URL)."""
    from medvqa.db.migrate import current_revision, upgrade

    database = _open_database(migrated=False)
    before = current_revision(database)
    upgrade(database)
    after = current_revision(database)
    url = database.engine.url.render_as_string(hide_password=True)
    _emit(as_json, {"database": url, "from": before, "to": after}, f"database {url}: {before or 'empty'} -> {after}")


@main.group()
def users() -> None:
    """Manage user accounts (roles: clinician, reviewer, ml_engineer, auditor, admin)."""


def _read_password() -> str:
    if sys.stdin.isatty():
        return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise MedVQAError("no password on standard input (give it on the first line)")
    return password


@users.command("add")
@click.argument("name")
@click.option("--role", required=True, help="clinician, reviewer, ml_engineer, auditor or admin.")
@click.option("--display-name", default="", help="Name shown in the workbench and the audit trail.")
@_json_option
def users_add(name: str, role: str, display_name: str, as_json: bool) -> None:
    """Add the account NAME. The password is read from a prompt, or from the first line of standard
    input when it is not a terminal; never from the command line."""
    from medvqa.services.users import add_user

    database = _open_database()
    user = add_user(database, _operator(), name, _read_password(), role, display_name)
    _emit(as_json, {"id": user.id, "username": user.username, "role": role}, f"added {user.username} ({role})")


@users.command("list")
@_json_option
def users_list(as_json: bool) -> None:
    """List accounts and their roles."""
    from sqlalchemy import select

    from medvqa.db import User

    database = _open_database()
    with database.read_session() as session:
        rows = [
            {"id": u.id, "username": u.username, "role": u.role.name, "active": u.is_active}
            for u in session.scalars(select(User).order_by(User.id))
        ]
    text = "\n".join(f"{r['id']:>4}  {r['username']:<24} {r['role']}" for r in rows) or "no users"
    _emit(as_json, {"users": rows}, text)


@main.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@_json_option
def import_command(paths: tuple[Path, ...], as_json: bool) -> None:
    """Import DICOM files, folders (recursive), zip files and DICOMDIRs; PNG and JPEG become
    secondary-capture studies. Everything is de-identified before it is stored. Every input (file, zip member,
    DICOMDIR entry, folder entry) gets one line: imported, already stored, skipped or refused, with the reason.
    Exits 1 when any input was refused; the other inputs are imported all the same."""
    from medvqa.config import load_settings
    from medvqa.services.studies import import_paths

    database = _open_database()
    try:
        report = import_paths(database, _operator(), list(paths), load_settings())
    except MedVQAError:
        raise
    except Exception as exc:  # a defect outside any one input: one line, never a traceback
        from medvqa.services.studies import describe_unexpected

        raise MedVQAError(
            f"the import stopped on {describe_unexpected(exc)}; files it stored without rows are removed by "
            "`medvqa store check --prune`"
        ) from None
    summary = report.as_dict()
    lines = [outcome.line() for outcome in report.outcomes]
    lines.append(
        f"imported {summary['imported']} instance(s) into {len(summary['studies'])} study(ies); "
        f"{summary['duplicate']} already stored, {summary['skipped']} skipped, {summary['refused']} refused, "
        f"{summary['held']} held until a reviewer confirms there is no burned-in text"
    )
    if report.swept:
        lines.append(f"removed {report.swept} unreferenced file(s) an interrupted import had left in the store")
    if report.left_in_store:
        lines.append(
            f"{report.left_in_store} file(s) of refused instances stay in the store while another import runs: "
            "the next import removes them (or `medvqa store check --prune`)"
        )
    _emit(as_json, summary, "\n".join(lines))
    if summary["refused"]:
        sys.exit(1)


@main.group()
def store() -> None:
    """Check the store of de-identified instances against the database."""


@store.command("check")
@click.option("--prune", is_flag=True, help="Remove files no row references and temporary files (audited).")
@_json_option
def store_check(prune: bool, as_json: bool) -> None:
    """Check that the store holds only files the database references and that every referenced file exists.
    A killed import can leave unreferenced files: --prune removes them, waiting for running imports to finish.
    Exits 1 when a referenced file is missing, or unreferenced files are left (without --prune)."""
    from medvqa.config import load_settings
    from medvqa.services.store_check import check_store

    report = check_store(_open_database(), _operator(), load_settings(), prune=prune)
    lines = [
        f"store: {report.files} file(s), {report.referenced} referenced by the database; "
        f"{len(report.unreferenced)} unreferenced, {len(report.leftovers)} temporary, {len(report.missing)} missing"
    ]
    lines += [f"missing: instance {row_id}: {path}" for row_id, path in report.missing[:20]]
    lines += [f"not medvqa's (left alone): {path}" for path in report.foreign[:20]]
    if report.removed:
        lines.append(f"removed {report.removed} file(s)")
    elif report.unreferenced or report.leftovers:
        lines.append("run `medvqa store check --prune` to remove the unreferenced and temporary files")
    _emit(as_json, report.as_dict(), "\n".join(lines))
    if not report.ok:
        sys.exit(1)


@main.group()
def studies() -> None:
    """Browse imported (de-identified) studies."""


@studies.command("list")
@_json_option
def studies_list(as_json: bool) -> None:
    """List studies, newest import first."""
    from medvqa.services.studies import list_studies

    rows = list_studies(_open_database(), _operator())
    text = "\n".join(_study_line(row) for row in rows)
    _emit(as_json, {"studies": rows}, text or "no studies")


def _study_line(row: dict[str, Any]) -> str:
    held = f" ({row['held']} held)" if row["held"] else ""
    counts = f"{row['series']} series, {row['instances']} instances{held}"
    return f"{row['id']:>5}  {row['modality']:<4} {row['body_part'] or '-':<10} {counts}  {row['study_uid']}"


@main.command("eval")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="VQA jsonl (image, question, answer...).")
@click.option("--model", "model", type=click.Path(path_type=Path), help="Local checkpoint; default: the workbench's.")
@click.option("--adapter", help="Adapter id or folder; default with no --model: the live adapter, if any.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N questions (a quick check).")
@click.option(
    "--no-blind", is_flag=True, help="Skip the baselines (the same model with black images, and with other images)."
)
@_json_option
def eval_command(
    data: Path, model: Path | None, adapter: str | None, limit: int | None, no_blind: bool, as_json: bool
) -> None:
    """Evaluate a model on a VQA file: closed accuracy, open exact match, token F1 and recall, overall
    accuracy, per question type and organ, and two baselines that show whether the image is used: blind (black
    images) and shuffled (each question asked about another image of the file)."""
    from medvqa.config import load_settings
    from medvqa.services.evaluation import run_evaluation

    report = run_evaluation(
        _open_database(),
        load_settings(),
        data,
        model=model,
        adapter=adapter,
        limit=limit,
        baselines=not no_blind,
        progress=not as_json,
    )
    _emit(as_json, report.to_json(), report.to_markdown())


@main.command("train")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="VQA jsonl to train on.")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Folder for the adapter and record.")
@click.option("--model", "model", type=click.Path(path_type=Path), help="Local checkpoint; default: the workbench's.")
@training_options
@click.option(
    "--train-vision",
    is_flag=True,
    help="Also train the vision tower and projector (saved in the adapter; vLLM cannot serve such an adapter).",
)
@_json_option
def train_command(
    data: Path,
    output: Path,
    model: Path | None,
    training: tuple[TrainSettings, LoraSettings],
    as_json: bool,
) -> None:
    """Train a LoRA adapter (LoRA-only unless --train-vision) on a VQA file and save it to --output.
    On GPUs run it through accelerate: `accelerate launch -m medvqa.cli train --data ... --output ...`
    (or `accelerate launch --no_python medvqa train ...`); not exercised here, where CI has no GPU."""
    from medvqa.config import load_settings
    from medvqa.services.evaluation import base_model_path
    from medvqa.training.train import train_adapter

    settings, lora = training
    base = model if model is not None else base_model_path(load_settings())
    result = train_adapter(base, data, output, lora, settings, progress=not as_json)
    text = (
        f"adapter {result.adapter_sha256[:12]} in {result.adapter_dir}: {result.steps} steps, "
        f"loss {result.train_loss:.4f}, {result.seconds:.1f} s"
    )
    _emit(as_json, result.as_dict(), text)


_user_option = click.option(
    "--user",
    "username",
    required=True,
    envvar="MEDVQA_USER",
    help="Account that asks or rates (clinician or reviewer); password from a prompt or stdin. Env: MEDVQA_USER.",
)


@main.command("ask")
@click.option("--study", required=True, help="Study UID (or id) from `medvqa studies list`.")
@click.option("--question", required=True, help="The question, in plain words.")
@click.option("--series", help="Series UID (or id); default: the study's first series.")
@click.option("--slice", "slice_index", type=click.IntRange(min=0), help="Slice number; default: the key slice.")
@click.option("--window", help="Window preset (ct_lung, ct_bone, ...), 'auto' or 'default'.")
@click.option("--question-type", default="", help="PRES, POS, MODALITY, PLANE, SIZE, ABN... (stored with it).")
@_user_option
@_json_option
def ask_command(
    study: str,
    question: str,
    series: str | None,
    slice_index: int | None,
    window: str | None,
    question_type: str,
    username: str,
    as_json: bool,
) -> None:
    """Ask a question about a study's image; the answer is stored with its provenance and printed."""
    from medvqa.config import load_settings
    from medvqa.services.ask import ImageChoice, ask, load_answering_model
    from medvqa.services.queries import series_id_for, study_id_for

    database, settings = _open_database(), load_settings()
    actor = _signed_in(database, username)
    study_id = study_id_for(database, study)
    series_id = series_id_for(database, study_id, series) if series else None
    choice = ImageChoice(series_id=series_id, slices=slice_index, window=window)
    model = load_answering_model(database, settings)
    result = ask(database, actor, settings, model, study_id, question, choice, question_type.upper())
    payload = {"answer_id": result.answer_id, "question": question, "answer": result.text}
    payload |= {"confidence": result.confidence, "provenance": result.provenance()}
    confidence = "-" if result.confidence is None else f"{result.confidence:.2f}"
    text = f"answer {result.answer_id}: {result.text}\nconfidence {confidence}; model {result.model_ref}"
    _emit(as_json, payload, text)


@main.command("feedback")
@click.argument("answer_id", type=int)
@click.option("--verdict", required=True, type=click.Choice(["correct", "partial", "incorrect"]))
@click.option("--correction", help="The right answer, when the model's was wrong or partly right.")
@click.option("--comment", help="Free-text comment.")
@click.option(
    "--key",
    "idempotency_key",
    help="Idempotency key; default: derived from the submission, so a rerun of the same command stores one record.",
)
@_user_option
@_json_option
def feedback_command(
    answer_id: int,
    verdict: str,
    correction: str | None,
    comment: str | None,
    idempotency_key: str | None,
    username: str,
    as_json: bool,
) -> None:
    """Rate answer ANSWER_ID. Feedback is append-only; repeating the same submission stores nothing new."""
    import hashlib

    from medvqa.services.feedback import FeedbackInput, give_feedback

    database = _open_database()
    actor = _signed_in(database, username)
    body = json.dumps([actor.name, answer_id, verdict, correction, comment])
    key = idempotency_key or "cli:" + hashlib.sha256(body.encode()).hexdigest()
    item = FeedbackInput(answer_id, verdict, key, correction=correction, comment=comment)
    result = give_feedback(database, actor, item)
    row = result.feedback
    payload = {"feedback_id": row.id, "answer_id": answer_id, "verdict": verdict, "created": result.created}
    state = "recorded" if result.created else "already recorded"
    _emit(as_json, payload, f"feedback {row.id} on answer {answer_id} {state}: {verdict}")


@main.command("workbench")
@click.option("--no-browser", is_flag=True, help="Do not open a browser tab (server use).")
def workbench_command(no_browser: bool) -> None:
    """Start the Streamlit workbench. Streamlit's own settings apply (STREAMLIT_SERVER_PORT,
    STREAMLIT_SERVER_ADDRESS, .streamlit/config.toml, ...)."""
    _open_database()  # fail here, in one line, rather than inside the app
    _run_workbench(headless=no_browser)


def _run_workbench(headless: bool) -> NoReturn:
    """Replace this process with `streamlit run workbench/app.py`: one process, so stopping it stops the app,
    and Streamlit reads its own settings (STREAMLIT_* variables, .streamlit/config.toml) as usual."""
    import os

    from workbench import APP_PATH

    env = dict(os.environ)
    if headless:
        env.setdefault("STREAMLIT_SERVER_HEADLESS", "true")
    env.setdefault("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")  # nothing leaves the hospital
    env.setdefault("STREAMLIT_CLIENT_TOOLBAR_MODE", "viewer")  # no developer menu (no "Deploy") for users
    env["STREAMLIT_CLIENT_SHOW_ERROR_DETAILS"] = "none"  # never a traceback on a page: the app logs it with an id
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "streamlit", "run", str(APP_PATH)], env)


@main.group()
def audit() -> None:
    """Inspect the audit trail."""


@audit.command("verify")
@click.option("--strict", is_flag=True, help="Also fail when the newest events are not in the anchor yet.")
@_json_option
def audit_verify(strict: bool, as_json: bool) -> None:
    """Check the hash chain and the anchor kept outside the database. Exits 1 and names the first bad
    sequence number when an event was edited, deleted, inserted or reordered, the tail was cut, or the
    chain was recomputed."""
    from compliance.policy import Action
    from medvqa.services import audit as audit_service
    from medvqa.services.transaction import write

    database = _open_database()
    report = audit_service.verify(database, strict)
    outcome = "success" if report.ok else "failed"
    summary = {"ok": report.ok, "events": report.events, "first_bad_seq": report.first_bad_seq}
    write(
        database,
        lambda s: audit_service.record(
            s, _operator(), Action.AUDIT_VERIFY, "audit", None, outcome=outcome, details=summary
        ),
    )
    if report.ok:
        text = f"audit trail OK: {report.events} events, anchored through {report.anchored_seq}"
        text += "".join(f"\nwarning: {w}" for w in report.warnings)
    else:
        text = f"audit trail BROKEN at event {report.first_bad_seq}: {report.reason}"
    _emit(as_json, report.as_dict(), text)
    if not report.ok:
        sys.exit(1)


@main.command()
@click.option("--no-app", is_flag=True, help="Set everything up but do not start the workbench.")
@click.option("--no-browser", is_flag=True, help="Start the workbench without opening a browser tab.")
def demo(no_app: bool, no_browser: bool) -> None:
    """Set up the embedded default: SQLite under MEDVQA_HOME, one demo account per role, and the
    VQA-RAD teaching images as de-identified demo studies (MEDVQA_DEMO_DATA); then start the workbench."""
    from sqlalchemy import select

    from medvqa.config import load_settings
    from medvqa.db import User
    from medvqa.db.migrate import upgrade
    from medvqa.services.users import add_user

    settings = load_settings()
    database = _open_database(migrated=False)
    upgrade(database)
    with database.read_session() as session:
        existing = set(session.scalars(select(User.username)))
    for username, role in DEMO_USERS.items():
        if username not in existing:
            add_user(database, _operator(), username, DEMO_PASSWORD, role, f"Demo {role}")
    click.echo(f"database: {database.engine.url.render_as_string(hide_password=True)}")
    click.echo(f"demo accounts (password {DEMO_PASSWORD!r}): " + ", ".join(f"{u} ({r})" for u, r in DEMO_USERS.items()))
    _import_demo_studies(database, settings)
    if no_app:
        return
    from medvqa.services.evaluation import base_model_path

    # Before the app, not at the first question: the first run converts SmolLM2 and folds the shipped weights.
    click.echo("preparing the answering model (the first run builds it under MEDVQA_HOME, about a minute)")
    click.echo(f"model: {base_model_path(settings)}")
    click.echo("starting the workbench (Ctrl+C stops it)")
    _run_workbench(headless=no_browser)


def _import_demo_studies(database: Database, settings: Any) -> None:
    from medvqa.imaging.demo import build_demo_files
    from medvqa.services.studies import import_paths

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


def _register_rounds() -> None:
    from medvqa.cli_rounds import rounds  # imports click only; torch loads when a round runs

    main.add_command(rounds)


_register_rounds()

if __name__ == "__main__":  # `python -m medvqa.cli`, e.g. under `accelerate launch -m medvqa.cli train ...`
    main()
