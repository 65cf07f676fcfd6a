"""The Streamlit workbench (pages for clinicians, reviewers, ML engineers and auditors).

UI only: pages call medvqa.services and never touch SQL or torch directly. Start it with `medvqa workbench`
(or `streamlit run workbench/server.py`: the app plus the session cookie's endpoints; `streamlit run
workbench/app.py` also works, but then a browser refresh signs the person out).
"""

from pathlib import Path

APP_PATH = Path(__file__).resolve().parent / "app.py"
SERVER_PATH = Path(__file__).resolve().parent / "server.py"
