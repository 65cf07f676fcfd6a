"""The medvqa workbench: sign-in, then the pages the signed-in role may open (st.navigation).

Run with `medvqa workbench` (or `streamlit run workbench/app.py`); Streamlit's own configuration
(STREAMLIT_SERVER_PORT, .streamlit/config.toml, ...) applies as usual.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from compliance.policy import Action, is_allowed
from workbench import auth
from workbench.error_boundary import hide_error_details, run_guarded

HERE = Path(__file__).resolve().parent
# (file, title, icon, the action a role needs to see the page)
PAGES = (
    ("app_pages/ask.py", "Ask", ":material/help:", Action.QUESTION_ASK),
    ("app_pages/review.py", "Review", ":material/fact_check:", Action.REVIEW_CREATE),
    ("app_pages/models.py", "Models and rounds", ":material/model_training:", Action.ADAPTER_READ),
    ("app_pages/audit.py", "Audit", ":material/policy:", Action.AUDIT_READ),
)


def pages_for(role: str) -> list[st.Page]:
    return [
        st.Page(HERE / path, title=title, icon=icon) for path, title, icon, action in PAGES if is_allowed(role, action)
    ]


def main() -> None:
    st.set_page_config(page_title="medvqa workbench", layout="wide")
    run_guarded(_run)


def _run() -> None:
    auth.enforce_session()
    actor = auth.current_actor()
    if actor is None:
        st.navigation([st.Page(auth.sign_in_page, title="Sign in", icon=":material/login:")]).run()
        return
    pages = pages_for(actor.role)
    with st.sidebar:
        st.caption(f"Signed in as {actor.name} ({actor.role})")
        if st.button("Sign out", key="sign_out"):
            auth.end_session()
            st.rerun()
    if not pages:
        st.warning(f"The role {actor.role!r} has no workbench page; the command line serves it.")
        return
    st.navigation(pages).run()


hide_error_details()
main()
