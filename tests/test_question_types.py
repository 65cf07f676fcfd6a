"""Free-text questions get a type by rules (presence, position, size, modality, plane, abnormality, organ, count,
colour, other); the agreement with VQA-RAD's labels is measured by bench/question_type_agreement.py."""

from __future__ import annotations

import pytest

from medvqa.services.question_types import QUESTION_TYPES, infer_question_type, normalise_label


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("Is there a pneumothorax?", "PRES"),
        ("Are there any fractures seen?", "PRES"),
        ("What is the mass in the left kidney?", "PRES"),
        ("Where is the lesion?", "POS"),
        ("Which lobe is the nodule in?", "POS"),
        ("Is the effusion on the left or right?", "POS"),
        ("How large is the mass?", "SIZE"),
        ("Is the heart enlarged?", "SIZE"),
        ("What imaging modality was used?", "MODALITY"),
        ("Is this an MRI?", "MODALITY"),
        ("Was contrast given?", "MODALITY"),
        ("In which plane is this image taken?", "PLANE"),
        ("Is this a sagittal image?", "PLANE"),
        ("Is this image normal?", "ABN"),
        ("Is there something abnormal in this image?", "ABN"),
        ("What organ is shown?", "ORGAN"),
        ("How many ribs are fractured?", "COUNT"),
        ("Is the lesion hyperintense?", "COLOR"),
        ("Why would this happen?", "OTHER"),
    ],
)
def test_types_by_rules(question, expected):
    assert infer_question_type(question) == expected


def test_case_spacing_and_typographic_quotes_do_not_change_the_type():
    assert infer_question_type("  WHERE   is the patient\u2019s  mass? ") == "POS"


def test_every_inferred_code_is_a_known_type():
    questions = ["", "?", "x" * 10_000, "Is", "what is/are the dark space near/in the center?"]
    assert {infer_question_type(q) for q in questions} <= set(QUESTION_TYPES)


def test_vqa_rad_labels_are_read_with_their_typos_mended():
    assert normalise_label("PRES, POS") == {"PRES", "POS"}
    assert normalise_label("PRSE") == {"PRES"} and normalise_label("ATRIB") == {"ATTRIB"}
    assert normalise_label("Other") == {"OTHER"}
