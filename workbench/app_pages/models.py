"""Models and rounds (ML engineer, admin): adapters with status, data snapshot and metrics; a candidate
compared with the live adapter per question type and organ; promotion (request, then another person's
approval) and one-step rollback."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from compliance.policy import Action
from medvqa.services.model_status import live_model_status
from medvqa.services.promotion import approve_promotion, compare_metrics, list_adapters, request_promotion, rollback
from medvqa.services.round_jobs import (
    RUNNING,
    JobOptions,
    cancel_round_job,
    latest_job,
    round_readiness,
    start_round_job,
)
from medvqa.services.rounds import list_rounds
from medvqa.services.validation import (
    VALIDATION_MEANINGS,
    list_validations,
    revoke_validation,
    sign_validation,
)
from workbench import resources
from workbench.auth import attempt, perform, require, show_notice


def adapters_table(adapters) -> None:
    columns = ("id", "name", "status", "snapshot", "requested_by", "promoted_at", "sha256")
    st.dataframe([{c: a[c] for c in columns} for a in adapters], hide_index=True, width="stretch")


def comparison(candidate, live) -> None:
    rows = compare_metrics(candidate["metrics"], live["metrics"] if live else None)
    if not rows:
        st.info("No per-question-type or per-organ metrics recorded for these adapters yet.")
        return
    frame = pd.DataFrame(rows)
    for group, title in (("question_type", "per question type"), ("organ", "per organ")):
        part = frame[frame["group"] == group]
        if not part.empty:
            st.caption(f"Overall accuracy {title}: candidate vs live")
            st.bar_chart(part, x="subgroup", y="value", color="adapter", stack=False)


def actions(actor, chosen) -> None:
    db = resources.database()
    reason = st.text_input("Reason (for a request or a rollback)", key="m_reason")
    first, second, third = st.columns(3)
    if first.button("Request promotion", key="m_request", disabled=chosen["status"] != "candidate"):
        notice = f"Promotion of adapter {chosen['id']} requested; an admin must approve it."
        perform(lambda: request_promotion(db, actor, chosen["id"], reason), notice)
    if second.button("Approve promotion", key="m_approve", disabled=not chosen["requested_by"]):
        notice = f"Adapter {chosen['id']} is live; new answers name it."
        perform(lambda: approve_promotion(db, actor, chosen["id"]), notice)
    if third.button("Roll back the live adapter", key="m_rollback"):
        perform(lambda: rollback(db, actor, reason), "Rolled back to the adapter that was live before.")


CALIBRATION_COLUMNS = {
    "n": "n",
    "accuracy": "accuracy",
    "mean_confidence": "mean confidence",
    "ece": "ECE",
    "brier": "Brier",
    "aurc": "AURC",
}


def calibration_section(status) -> None:
    """How far the live model's confidences hold on its locked test set: a table, the reliability diagram and
    the risk-coverage curve (docs/calibration.md explains each figure)."""
    st.subheader("Confidence of the live model")
    figures = status.calibration if status is not None else None
    if not figures or not any(figures.get(kind) for kind in ("closed", "open")):
        st.info("The live model's confidences have not been measured against its locked test set yet.")
        return
    rows = []
    for kind in ("closed", "open"):
        data = figures.get(kind)
        if data:
            row = {"answers": kind} | {label: data[key] for key, label in CALIBRATION_COLUMNS.items()}
            row |= {f"accuracy @{float(c):.0%} coverage": v for c, v in data["selective_accuracy"].items()}
            rows.append(row)
    st.caption(f"{status.name}, on {status.data or 'its locked test set'}")
    st.dataframe(rows, hide_index=True, width="stretch")
    plots = _plots(json.dumps(figures, sort_keys=True))
    left, right = st.columns(2)
    left.image(str(plots["reliability"]), caption="Reliability: accuracy against confidence (diagonal: calibrated)")
    right.image(str(plots["risk_coverage"]), caption="Risk-coverage: error of the most confident answers kept")


@st.cache_data(max_entries=8, show_spinner=False)
def _plots(figures_json: str) -> dict[str, Path]:
    from medvqa.training.calibration import write_plots

    folder = Path(tempfile.mkdtemp(prefix="medvqa-calibration-"))
    return write_plots(json.loads(figures_json), folder)


def validation_section(actor) -> None:
    """Clinical validation: every signed statement (standing or revoked); an administrator signs one for the live
    model, or revokes one. Until a standing one covers the live weights, every answer says "not validated"."""
    st.subheader("Clinical validation")
    db = resources.database()
    rows = attempt(lambda: list_validations(db, actor)) or []
    if rows:
        columns = ("id", "name", "signer", "signed_at", "revoked_at", "statement")
        st.dataframe([{c: row[c] for c in columns} for row in rows], hide_index=True, width="stretch")
    else:
        st.caption('No model has been validated: every answer carries the "not validated" banner.')
    if actor.role != "admin":
        return
    with st.expander("Validate the live model (administrator, signed)"):
        with st.form("validate_model"):
            statement = st.text_area(
                "Statement: the scope (patients, modalities, questions) and the evidence of validation",
                key="v_statement",
            )
            meaning = st.selectbox(
                "Meaning of your signature",
                list(VALIDATION_MEANINGS),
                format_func=VALIDATION_MEANINGS.__getitem__,
                key="v_meaning",
            )
            password = st.text_input(f"Password of {actor.name}, to sign", type="password", key="v_password")
            signed = st.form_submit_button("Sign the validation")
        if signed:
            settings = resources.settings()
            perform(
                lambda: sign_validation(db, actor, settings, statement, meaning, password),
                "The live model is validated; answers now say so and name your statement.",
            )
    standing = [row for row in rows if row["revoked_at"] is None]
    if standing:
        with st.expander("Revoke a validation"):
            chosen = st.selectbox("Validation", [row["id"] for row in standing], key="v_revoke_id")
            reason = st.text_input("Why", key="v_revoke_reason")
            if st.button("Revoke", key="v_revoke"):
                perform(lambda: revoke_validation(db, actor, chosen, reason), f"Validation {chosen} revoked.")


def rounds_section(actor) -> None:
    """Run the loop from here: how many reviewed answers wait, a round started as a background process (one at
    a time; it survives a refresh), its progress, log and cancel, then its gate verdict; the rounds over time."""
    st.subheader("Fine-tuning rounds")
    db, settings = resources.database(), resources.settings()
    ready = attempt(lambda: round_readiness(db, actor, settings))
    if ready is not None:
        since = "" if ready.last_round_id is None else f", {ready.since_last_round} since round {ready.last_round_id}"
        enough = "enough for a round" if ready.usable >= ready.min_examples else "not yet enough for a round"
        st.caption(
            f"{ready.usable} reviewed answers usable for training{since}; a round needs {ready.min_examples} "
            f"(MEDVQA_ROUND_MIN_EXAMPLES): {enough}."
        )
    job = attempt(lambda: latest_job(db, actor, settings))
    if job is not None and job.state == RUNNING:
        running_job(actor, job.name)
    else:
        if job is not None:
            finished_job(job)
        if actor.role == "ml_engineer":
            start_form(actor)
    history_chart(actor)


def start_form(actor) -> None:
    with st.form("start_round"):
        left, middle, right = st.columns(3)
        epochs = left.number_input("Epochs", min_value=0.1, value=1.0, step=0.5, key="r_epochs")
        max_steps = middle.number_input("Max steps (-1: use epochs)", min_value=-1, value=-1, step=1, key="r_steps")
        since = right.number_input("Only answers decided after round (0: all)", min_value=0, value=0, key="r_since")
        started = st.form_submit_button("Start a round")
    if started:
        options = JobOptions(float(epochs), int(max_steps), int(since) or None)
        db, settings = resources.database(), resources.settings()
        perform(lambda: start_round_job(db, actor, settings, options), "The round started in the background.")


@st.fragment(run_every=3)
def running_job(actor, name: str) -> None:
    """The running job, read again every three seconds; when it ends, the whole page shows the outcome."""
    job = attempt(lambda: latest_job(resources.database(), actor, resources.settings()))
    if job is None or job.name != name or job.state != RUNNING:
        st.rerun()
    st.info(f"Round job {job.name} started by {job.started_by} at {job.started_at} is running.")
    progress = job.progress if job.progress is not None else 0.0
    st.progress(progress, text="training" if job.progress is not None else "preparing the data snapshot and model")
    st.code(job.log_tail or "(no output yet)", language=None)
    if actor.role == "ml_engineer" and st.button("Cancel the round", key="r_cancel"):
        db, settings = resources.database(), resources.settings()
        perform(lambda: cancel_round_job(db, actor, settings, name), f"Round job {name} cancelled.")


def finished_job(job) -> None:
    if job.state == "finished":
        verdict = "passed the gate" if job.gate_passed else "did not pass the gate"
        st.success(
            f"The last round job ({job.name}, {job.started_by}) made round {job.round_id}, which {verdict}; its "
            "candidate adapter is in the table below, with its comparison against the live one."
        )
    else:
        st.warning(f"The last round job ({job.name}, {job.started_by}) {job.state}: {job.error or 'no reason given'}")
    with st.expander("Its log"):
        st.code(job.log_tail or "(no output)", language=None)


def history_chart(actor) -> None:
    rounds = attempt(lambda: list_rounds(resources.database(), actor)) or []
    points = [
        {"round": r["id"], "adapter": side, "locked-test accuracy": r["test_overall"][side]}
        for r in reversed(rounds)
        for side in ("live", "candidate")
        if r["test_overall"].get(side) is not None
    ]
    if not points:
        st.caption("No round has been run yet: the history chart appears after the first.")
        return
    st.caption("Locked-test accuracy per round: the candidate against the adapter live when it ran")
    st.line_chart(pd.DataFrame(points), x="round", y="locked-test accuracy", color="adapter")
    gates = [{"round": r["id"], "gate": "passed" if r["gate"].get("passed") else "failed"} for r in rounds]
    st.dataframe(gates, hide_index=True)


def page() -> None:
    actor = require(Action.ADAPTER_READ)
    st.title("Models and rounds")
    show_notice()
    calibration_section(attempt(lambda: live_model_status(resources.database(), resources.settings())))
    validation_section(actor)
    rounds_section(actor)
    adapters = attempt(lambda: list_adapters(resources.database(), actor)) or []
    if not adapters:
        st.info("No adapters yet: a fine-tuning round registers its adapter here as a candidate.")
        return
    adapters_table(adapters)
    labels = {a["id"]: f"#{a['id']} {a['name']} ({a['status']})" for a in adapters}
    chosen_id = st.selectbox("Adapter", list(labels), format_func=labels.__getitem__, key="m_adapter")
    chosen = next(a for a in adapters if a["id"] == chosen_id)
    live = next((a for a in adapters if a["status"] == "live"), None)
    with st.expander(f"Metrics and training data of adapter {chosen['id']}"):
        st.caption(f"training data snapshot: {chosen['snapshot'] or 'not recorded'}; base model {chosen['base_model']}")
        st.json(chosen["metrics"] or {})
    comparison(chosen, live if live is not chosen else None)
    actions(actor, chosen)


page()
