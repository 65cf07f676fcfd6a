"""`medvqa ask`, `medvqa feedback`: a named clinician or reviewer asks about a study and rates an answer."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from medvqa.cli.support import emit as _emit
from medvqa.cli.support import json_option as _json_option
from medvqa.cli.support import open_database as _open_database
from medvqa.cli.support import signed_in as _signed_in
from medvqa.cli.support import user_option

if TYPE_CHECKING:
    pass

_user_option = user_option("a clinician or reviewer who asks or rates")


@click.command("ask")
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


@click.command("feedback")
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
