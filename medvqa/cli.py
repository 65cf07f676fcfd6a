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

from compliance.policy import DEMO_PASSWORD
from medvqa.cli_support import OneLineErrorGroup, training_options
from medvqa.cli_support import emit as _emit
from medvqa.cli_support import json_option as _json_option
from medvqa.cli_support import open_database as _open_database
from medvqa.cli_support import operator as _operator
from medvqa.cli_support import signed_in as _signed_in
from medvqa.cli_support import study_line as _study_line
from medvqa.errors import MedVQAError

if TYPE_CHECKING:
    from medvqa.model.adapters import LoraSettings
    from medvqa.services.database import Database
    from medvqa.training.train import TrainSettings

DEMO_USERS = {  # username -> role; the demo is for trying the workbench, never for patient data
    "dr.demo": "clinician",
    "reviewer.demo": "reviewer",
    "reviewer2.demo": "reviewer",  # a second reader: double reading and Cohen's kappa can be tried
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
    from medvqa.services.database import database_url, upgrade_database

    database = _open_database(migrated=False)
    before, after = upgrade_database(database)
    url = database_url(database)
    _emit(as_json, {"database": url, "from": before, "to": after}, f"database {url}: {before or 'empty'} -> {after}")


@db.command("grant")
@click.argument("role")
@_json_option
def db_grant(role: str, as_json: bool) -> None:
    """PostgreSQL: grant the existing role ROLE what the application needs and no more (insert-only on the
    append-only tables), so that the workbench can run as a role that cannot disable their triggers. Run it
    as the tables' owner, after `medvqa db upgrade`."""
    from medvqa.services.database import grant_role

    statements = grant_role(_open_database(migrated=False), role)
    _emit(as_json, {"role": role, "statements": statements}, "\n".join(f"{s};" for s in statements))


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
    """List accounts, their roles, and whether they are disabled or locked."""
    from medvqa.config import load_settings
    from medvqa.services.users import list_users

    rows = list_users(_open_database(), _operator(), load_settings())

    def line(row: dict[str, Any]) -> str:
        state = "active" if row["active"] else "disabled"
        if row["locked_until"]:
            state += f", locked until {row['locked_until']}"
        return f"{row['id']:>4}  {row['username']:<24} {row['role']:<12} {state}"

    _emit(as_json, {"users": rows}, "\n".join(line(r) for r in rows) or "no users")


@users.command("disable")
@click.argument("name")
def users_disable(name: str) -> None:
    """Disable the account NAME: it cannot sign in, and its open workbench sessions end at their next request."""
    from medvqa.services.users import set_active

    set_active(_open_database(), _operator(), name, active=False)
    click.echo(f"disabled {name}; its workbench sessions end at their next request")


@users.command("enable")
@click.argument("name")
def users_enable(name: str) -> None:
    """Enable the account NAME again."""
    from medvqa.services.users import set_active

    set_active(_open_database(), _operator(), name, active=True)
    click.echo(f"enabled {name}")


@users.command("role")
@click.argument("name")
@click.argument("role")
def users_role(name: str, role: str) -> None:
    """Give the account NAME the role ROLE; its open workbench sessions end at their next request."""
    from medvqa.services.users import change_role

    change_role(_open_database(), _operator(), name, role)
    click.echo(f"{name} is now {role}; its workbench sessions end at their next request")


@users.command("unlock")
@click.argument("name")
def users_unlock(name: str) -> None:
    """Lift the lockout of NAME after too many failed sign-ins."""
    from medvqa.services.users import unlock

    unlock(_open_database(), _operator(), name)
    click.echo(f"unlocked {name}")


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
        from medvqa.services.preparation import describe_unexpected

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


@main.command("eval")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="VQA jsonl (image, question, answer...).")
@click.option("--model", "model", type=click.Path(path_type=Path), help="Local checkpoint; default: the workbench's.")
@click.option("--adapter", help="Adapter id or folder; default with no --model: the live adapter, if any.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N questions (a quick check).")
@click.option(
    "--no-blind", is_flag=True, help="Skip the baselines (the same model with black images, and with other images)."
)
@click.option(
    "--predictions",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write one JSON line per question and condition (own, blind, shuffled) with answer and confidence.",
)
@click.option(
    "--plots",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write the reliability diagram and risk-coverage curve (PNG) to this folder; the report links them.",
)
@click.option("--raw-confidence", is_flag=True, help="Ignore the weights' calibration.json: raw confidences.")
@_json_option
def eval_command(
    data: Path,
    model: Path | None,
    adapter: str | None,
    limit: int | None,
    no_blind: bool,
    predictions: Path | None,
    plots: Path | None,
    raw_confidence: bool,
    as_json: bool,
) -> None:
    """Evaluate a model on a VQA file: closed accuracy, open exact match, token F1 and recall, overall
    accuracy, per question type and organ, two baselines that show whether the image is used (blind: black
    images; shuffled: each question asked about another image of the file), and how far the confidences hold
    (ECE, Brier, risk-coverage, selective accuracy; calibrated when the weights carry a calibration.json)."""
    from medvqa.config import load_settings
    from medvqa.services.evaluation import run_evaluation
    from medvqa.training.calibration import write_plots
    from medvqa.training.evaluate import write_predictions

    report = run_evaluation(
        _open_database(),
        load_settings(),
        data,
        model=model,
        adapter=adapter,
        limit=limit,
        baselines=not no_blind,
        progress=not as_json,
        calibrated=not raw_confidence,
    )
    result, markdown = report.to_json(), report.to_markdown()
    if predictions is not None:
        result["predictions"] = {"file": str(predictions), "lines": write_predictions(report, predictions)}
    if plots is not None:
        paths = write_plots(report.calibration(), plots, title=f"{report.model_ref} on {data.name}")
        result["plots"] = {name: str(path) for name, path in paths.items()}
        markdown += "".join(f"\n![{name}]({path})\n" for name, path in paths.items())
    _emit(as_json, result, markdown)


@main.command("calibrate")
@click.option(
    "--data", required=True, type=click.Path(path_type=Path), help="Held-out VQA jsonl (never the locked test set)."
)
@click.option("--model", "model", type=click.Path(path_type=Path), help="Local checkpoint; default: the workbench's.")
@click.option("--adapter", help="Adapter id or folder; default with no --model: the live adapter, if any.")
@click.option(
    "--user",
    "username",
    required=True,
    envvar="MEDVQA_USER",
    help="ML engineer who fits it; password from a prompt or stdin. Env: MEDVQA_USER.",
)
@_json_option
def calibrate_command(data: Path, model: Path | None, adapter: str | None, username: str, as_json: bool) -> None:
    """Fit the confidence calibration and abstention thresholds of the weights on held-out questions and write
    calibration.json beside them (the adapter's folder, or the model's); answers then carry it."""
    from medvqa.config import load_settings
    from medvqa.services.calibration import fit_model_calibration
    from medvqa.training.calibration import MIN_FIT

    database = _open_database()
    actor = _signed_in(database, username)
    outcome = fit_model_calibration(
        database, actor, load_settings(), data, model=model, adapter=adapter, progress=not as_json
    )
    lines = [f"{outcome.path} ({outcome.sha256[:12]})"]
    for kind, entry in outcome.calibration.kinds.items():
        threshold = "always abstain" if entry.threshold is None else f"abstain below {entry.threshold:.3f}"
        if entry.held_out < MIN_FIT:
            threshold = "too few to set a threshold"
        lines.append(
            f"{kind}: {entry.calibrator.method} on {entry.held_out} held-out answers; {threshold} "
            f"(precision target {entry.precision_target:.0%})"
        )
    _emit(as_json, outcome.as_dict(), "\n".join(lines))


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
@click.option(
    "--question-type", default="", help="PRES, POS, MODALITY, PLANE, SIZE, ABN...; default: inferred from the words."
)
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
    payload |= {"confidence": result.confidence, "raw_confidence": result.raw_confidence}
    payload |= {"abstained": result.abstained, "provenance": result.provenance()}
    confidence = "-" if result.confidence is None else f"{result.confidence:.2f}"
    calibrated = "calibrated" if result.calibration else "not calibrated"
    shown = result.text
    if result.abstained:
        shown = f"(not confident enough to answer; the model's raw answer was: {result.text})"
    text = f"answer {result.answer_id}: {shown}\nconfidence {confidence} ({calibrated}); model {result.model_ref}"
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


@main.group()
def audit() -> None:
    """Inspect the audit trail."""


@audit.command("verify")
@click.option(
    "--strict",
    is_flag=True,
    help="Also fail on the crash windows: events without their commit line, "
    "intent lines without an event. Use after a clean stop of every writer.",
)
@_json_option
def audit_verify(strict: bool, as_json: bool) -> None:
    """Check the hash chain, the anchor kept outside the database (and its keyed lines), every record the
    trail vouches for (feedback, answers, reviews, users, adapters, rounds, studies...), and the
    append-only triggers. Exits 1 naming the first bad event, or the records, when anything was edited,
    deleted, inserted, reordered or cut, or the chain was recomputed."""
    from medvqa.services.audit_log import verify_trail

    report = verify_trail(_open_database(), _operator(), strict)
    lines = []
    if report.ok:
        lines.append(
            f"audit trail OK: {report.events} events, {report.rows_checked} records, "
            f"anchored through {report.anchored_seq}"
        )
    elif report.first_bad_seq is not None:
        lines.append(f"audit trail BROKEN at event {report.first_bad_seq}: {report.reason}")
    else:
        lines.append(f"audit trail BROKEN: {report.reason}")
    lines += [f"record: {problem}" for problem in report.row_problems[1:]]
    lines += [f"schema: {problem}" for problem in report.schema_problems[1:]]
    lines += [f"warning: {warning}" for warning in report.warnings]
    lines += [f"note: {note}" for note in report.notes]
    _emit(as_json, report.as_dict(), "\n".join(lines))
    if not report.ok:
        sys.exit(1)


@audit.command("export")
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="CSV file to write ('-' for standard output).",
)
@click.option("--raw", is_flag=True, help="Stored values unchanged (to recompute hashes); never open in a spreadsheet.")
@click.option("--user", "user", default="", help="Only events of this actor.")
@click.option("--action", default="", help="Only this action (e.g. answer:feedback:create).")
@click.option("--since", type=click.DateTime(), help="From this UTC time.")
@click.option("--until", type=click.DateTime(), help="Up to this UTC time (inclusive).")
@_json_option
def audit_export(output: Path, raw: bool, user: str, action: str, since: Any, until: Any, as_json: bool) -> None:
    """Export every matching event (no limit, streamed) as CSV with its hashes; the export is audited."""
    from datetime import UTC

    from medvqa.services.audit_log import AuditFilter, write_csv

    search = AuditFilter(
        user=user,
        action=action,
        since=since.replace(tzinfo=UTC) if since else None,
        until=until.replace(tzinfo=UTC) if until else None,
    )
    database = _open_database()
    if str(output) == "-":
        write_csv(database, _operator(), sys.stdout, search, raw=raw)
        return
    temporary = output.with_name(f".{output.name}.partial")
    with temporary.open("w", encoding="utf-8", newline="") as handle:
        count = write_csv(database, _operator(), handle, search, raw=raw)
    temporary.replace(output)  # a reader never sees half an export
    _emit(as_json, {"rows": count, "output": str(output)}, f"exported {count} event(s) to {output}")


@audit.command("rotate-key")
@_json_option
def audit_rotate_key(as_json: bool) -> None:
    """Start signing anchor lines with a new key (MEDVQA_AUDIT_ANCHOR_KEY_FILE keeps the old ones for the
    lines they signed; a line signed with an old key after the new one was used fails verification)."""
    from medvqa.services.audit_log import rotate_anchor_key

    kid = rotate_anchor_key(_open_database(), _operator())
    _emit(as_json, {"key_id": kid}, f"anchor lines are now signed with key {kid}")


@main.command()
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


def _register_rounds() -> None:
    from medvqa.cli_rounds import rounds  # imports click only; torch loads when a round runs

    main.add_command(rounds)
    from medvqa.cli_pacs import listen_command, pacs  # imports click only; the PACS libraries load when used

    main.add_command(pacs)
    main.add_command(listen_command)


_register_rounds()

if __name__ == "__main__":  # `python -m medvqa.cli`, e.g. under `accelerate launch -m medvqa.cli train ...`
    main()
