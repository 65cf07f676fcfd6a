from pathlib import Path

from compliance.policy import policy_markdown

COMPLIANCE = Path(__file__).resolve().parents[1] / "compliance"


def test_access_policy_document_matches_the_code():
    document = (COMPLIANCE / "access_policy.md").read_text()
    assert document.rstrip().endswith(policy_markdown()), "regenerate the table with policy_markdown()"
