"""The Streamlit workbench (pages for clinicians, reviewers, ML engineers and auditors).

UI only: pages call medvqa.services and never touch SQL or torch directly. Start it with `medvqa workbench`
(or `streamlit run workbench/app.py`).
"""

from pathlib import Path

APP_PATH = Path(__file__).resolve().parent / "app.py"
