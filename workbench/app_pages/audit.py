"""Audit (auditor, admin): the trail filtered by user, action, object and time; the chain check; CSV export."""

from __future__ import annotations

from datetime import UTC, datetime, time

import streamlit as st

from compliance.policy import Action
from medvqa.services.audit_log import AuditFilter, export_csv, filter_choices, list_events, verify_trail
from workbench import resources
from workbench.auth import attempt, require


def filters(actor) -> AuditFilter | None:
    choices = attempt(lambda: filter_choices(resources.database(), actor)) or {}
    first, second, third = st.columns(3)
    user = first.selectbox("User", ["", *choices.get("user", [])], key="a_user")
    action = second.selectbox("Action", ["", *choices.get("action", [])], key="a_action")
    object_type = third.selectbox("Object type", ["", *choices.get("object_type", [])], key="a_object_type")
    object_id = first.text_input("Object id", key="a_object_id")
    since = second.date_input("From (UTC)", value=None, key="a_since")
    until = third.date_input("To (UTC, inclusive)", value=None, key="a_until")
    return attempt(
        lambda: AuditFilter(
            user=user,
            action=action,
            object_type=object_type,
            object_id=object_id,
            since=datetime.combine(since, time.min, UTC) if since else None,
            until=datetime.combine(until, time.max, UTC) if until else None,
        )
    )


def verify_panel(actor) -> None:
    if st.button("Verify the audit chain", key="verify"):
        report = attempt(lambda: verify_trail(resources.database(), actor))
        if report is not None:
            st.session_state["verify_report"] = report
    report = st.session_state.get("verify_report")
    if report is None:
        return
    if report.ok:
        st.success(
            f"Audit trail OK: {report.events} events and {report.rows_checked} records, "
            f"anchored through {report.anchored_seq}."
        )
    elif report.first_bad_seq is not None:
        st.error(f"Audit trail BROKEN at event {report.first_bad_seq}: {report.reason}")
    else:
        st.error(f"Audit trail BROKEN: {report.reason}")
    for problem in [*report.row_problems[1:], *report.schema_problems[1:]]:
        st.error(problem)
    for warning in [*report.warnings, *report.notes]:
        st.warning(warning)


def export_panel(actor, search: AuditFilter) -> None:
    """Exporting is itself an audited action: the CSV is made (and recorded) on request, then downloaded."""
    raw = st.checkbox(
        "Raw values (to re-check hashes; do not open in a spreadsheet)",
        key="export_raw",
        help="By default, cells a spreadsheet would run as formulas get a leading apostrophe.",
    )
    if st.button("Prepare CSV export", key="export"):
        exported = attempt(lambda: export_csv(resources.database(), actor, search, raw=raw))
        if exported is not None:
            st.session_state["audit_csv"] = exported
    exported = st.session_state.get("audit_csv")
    if exported:
        rows = exported.count("\n") - 1
        st.download_button(f"Download CSV ({rows} events)", exported, "audit-events.csv", "text/csv", key="download")


def page() -> None:
    actor = require(Action.AUDIT_READ)
    st.title("Audit")
    search = filters(actor)
    if search is None:
        return
    events = attempt(lambda: list_events(resources.database(), actor, search)) or []
    st.caption(f"{len(events)} event(s), newest first (at most 500 shown; the export holds every match)")
    st.dataframe(events, hide_index=True, width="stretch")
    left, right = st.columns(2)
    with left:
        verify_panel(actor)
    with right:
        export_panel(actor, search)


page()
