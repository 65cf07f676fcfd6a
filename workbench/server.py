"""The workbench as served: the Streamlit app (app.py) plus the session cookie's endpoints
(workbench/session_cookie.py), so that a browser refresh or an opened link keeps the person signed in.

`medvqa workbench` and `medvqa demo` run `streamlit run workbench/server.py`; Streamlit finds `app` below and
serves it with its own settings (STREAMLIT_SERVER_PORT, .streamlit/config.toml, ...).
"""

import streamlit as st

from workbench import session_cookie

app = st.App("app.py", routes=session_cookie.routes())
