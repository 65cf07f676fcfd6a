"""The workbench never shows a traceback: an unexpected exception on any page becomes one line with an error id,
and the server log gets the same id with the traceback (the page never sees file paths, values or stack frames).

Streamlit's control flow (st.rerun, st.stop, st.switch_page) raises ScriptControlException, a BaseException:
it is not caught here and passes through as it must. Streamlit's own exception display is turned off as well
(`client.showErrorDetails = "none"`), for anything raised outside the boundary."""

from __future__ import annotations

import logging
import secrets
import sys
from collections.abc import Callable

import streamlit as st

log = logging.getLogger("medvqa.workbench")
if not log.handlers:  # this module is imported once per server process: one handler, to the server's stderr
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)


def hide_error_details() -> None:
    """Streamlit shows no exception details of its own, however the app was started."""
    try:
        st.set_option("client.showErrorDetails", "none")
    except Exception:  # an older Streamlit without the option: the boundary below still holds
        log.warning("could not turn off client.showErrorDetails")


def run_guarded(page: Callable[[], object]) -> None:
    """Run the page; an unexpected exception is logged with a new error id and shown as one line."""
    try:
        page()
    except Exception:
        error_id = secrets.token_hex(4)
        log.exception("workbench error %s", error_id)
        st.error(
            f"Something went wrong and this page could not be shown (error id {error_id}). "
            "Try again; if it happens again, give the error id to your administrator."
        )
