"""Helpers for driving the workbench with streamlit.testing's AppTest."""

from __future__ import annotations

import streamlit as st
from streamlit.testing.v1 import AppTest

from medvqa.services.audit import Actor
from workbench import APP_PATH
from workbench.auth import ACTOR

TIMEOUT = 120


def fresh_app() -> AppTest:
    """The app as a new browser session sees it; cached engines of earlier tests are dropped."""
    st.cache_resource.clear()
    return AppTest.from_file(str(APP_PATH), default_timeout=TIMEOUT)


def signed_in(actor: Actor) -> AppTest:
    app = fresh_app()
    app.session_state[ACTOR] = actor
    return app


def sign_in(app: AppTest, username: str, password: str) -> AppTest:
    app.run()
    app.text_input(key="sign_in_username").input(username)
    app.text_input(key="sign_in_password").input(password)
    app.button[0].click()
    return app.run()


def errors(app: AppTest) -> list[str]:
    return [element.value for element in app.error]


def on_page(actor: Actor, page: str) -> AppTest:
    """Signed in as `actor`, on `page` (e.g. "app_pages/review.py"), run once."""
    app = signed_in(actor).run()
    app.switch_page(page)
    return app.run()
