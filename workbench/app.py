"""The medvqa workbench: sign-in, then the pages the signed-in role may open (st.navigation).

Every page has its own address (/ask, /review, /models, /audit; the Ask page's open study as ?study=ID). Opened
signed out, an address shows the sign-in form and, once signed in, the page itself. A page the role may not
open is not in the menu; reached by its address, it shows the refusal, which is audited.

Run with `medvqa workbench` (or `streamlit run workbench/server.py`); Streamlit's own configuration
(STREAMLIT_SERVER_PORT, .streamlit/config.toml, ...) applies as usual.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from compliance.policy import Action, is_allowed
from workbench import auth
from workbench.error_boundary import hide_error_details, run_guarded

HERE = Path(__file__).resolve().parent
# (file, address, title, icon, the action a role needs to see the page)
PAGES = (
    ("app_pages/ask.py", "ask", "Ask", ":material/help:", Action.QUESTION_ASK),
    ("app_pages/review.py", "review", "Review", ":material/fact_check:", Action.REVIEW_CREATE),
    ("app_pages/models.py", "models", "Models and rounds", ":material/model_training:", Action.ADAPTER_READ),
    ("app_pages/audit.py", "audit", "Audit", ":material/policy:", Action.AUDIT_READ),
)


def pages_for(role: str) -> list[st.Page]:
    """The pages the role may open, in the menu, then the others, hidden: reached by their address they run
    their own role check, which shows and audits the refusal. The root address opens the first page the role
    may open (through a hidden default page, so that every page keeps its own address)."""
    allowed = [entry for entry in PAGES if is_allowed(role, entry[4])]
    refused = [entry for entry in PAGES if not is_allowed(role, entry[4])]
    pages = [
        st.Page(HERE / path, title=title, icon=icon, url_path=address, visibility=visibility)
        for group, visibility in ((allowed, "visible"), (refused, "hidden"))
        for path, address, title, icon, _ in group
    ]
    if not allowed:
        return []

    def home() -> None:
        st.switch_page(pages[0], query_params=st.query_params.to_dict())

    return [st.Page(home, title=pages[0].title, url_path=HOME, default=True, visibility="hidden"), *pages]


HOME = "home"  # the hidden default page behind the root address: it only moves on to the role's first page


def sign_in_pages() -> list[st.Page]:
    """Signed out, every page's address shows the sign-in form, so that a refresh or an opened link lands on
    the page it named once the person has signed in."""
    return [
        st.Page(auth.sign_in_page, title="Sign in", icon=":material/login:", url_path="sign-in", default=True),
        *(
            st.Page(auth.sign_in_page, title="Sign in", url_path=address, visibility="hidden")
            for _, address, *_ in PAGES
        ),
    ]


def main() -> None:
    st.set_page_config(page_title="medvqa workbench", layout="wide")
    run_guarded(_run)


def _run() -> None:
    auth.resume_from_cookie()
    auth.enforce_session()
    actor = auth.current_actor()
    if actor is None:
        page = st.navigation(sign_in_pages())
        auth.sync_cookie()
        page.run()
        return
    pages = pages_for(actor.role)
    with st.sidebar:
        st.caption(f"Signed in as {actor.name} ({actor.role})")
        if st.button("Sign out", key="sign_out"):
            auth.end_session()
            st.rerun()
    if not pages:
        auth.sync_cookie()
        st.warning(f"The role {actor.role!r} has no workbench page; the command line serves it.")
        return
    page = st.navigation(pages)
    if page is not pages[0]:  # not the root's page, which only moves on (its run would never be seen)
        auth.sync_cookie()
    page.run()


hide_error_details()
main()
