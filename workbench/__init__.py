"""The Streamlit workbench (pages for clinicians, reviewers, ML engineers and auditors).

UI only: pages call medvqa.services and never touch SQL or torch directly.
"""
