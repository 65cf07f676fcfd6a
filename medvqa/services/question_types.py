"""The type of a free-text question, by rules: presence, position, size, modality, plane, abnormality, organ,
count, colour, or other. Templates carry their own type; a typed question is stored with the type inferred here,
so the reviewer queue and a round's subgroup gate see it.

The codes are VQA-RAD's (PRES, POS, SIZE, MODALITY, PLANE, ABN, ORGAN, COUNT, COLOR, OTHER). How well the rules
agree with VQA-RAD's own labels is measured on its training questions by bench/question_type_agreement.py (the
test questions are never used to write or tune them); docs/benchmarks and the README give the figure.
"""

from __future__ import annotations

import re

QUESTION_TYPES = ("PRES", "POS", "SIZE", "MODALITY", "PLANE", "ABN", "ORGAN", "COUNT", "COLOR", "OTHER")
NAMES = {
    "PRES": "presence",
    "POS": "position",
    "SIZE": "size",
    "MODALITY": "modality",
    "PLANE": "plane",
    "ABN": "abnormality",
    "ORGAN": "organ",
    "COUNT": "count",
    "COLOR": "colour or density",
    "OTHER": "other",
}

# First match wins: the specific kinds before the general ones (a "where is the mass" question is about position
# although it names a finding; "is this an MRI" is about modality although it asks yes or no).
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (code, re.compile(pattern))
    for code, pattern in (
        ("COUNT", r"\bhow many\b|\bnumber of\b|\bcount\b"),
        (
            "PLANE",
            r"\bplanes?\b|\baxial\b|\bsagittal\b|\bcoronal\b|\btransverse\b|\bprojection\b|\borientation\b"
            r"|\b(pa|ap)\b|\b(lateral|frontal|oblique) (view|film|image|radiograph)|\bview\b.*\btaken\b"
            r"|\bsection\b|\bslice\b.*\btaken\b",
        ),
        (
            "MODALITY",
            r"\bmodality\b|\bimaging (method|technique|type)\b|\bkind of (scan|image|imaging|study)\b"
            r"|\btype of (scan|image|imaging|study)\b|\bwhat (scan|imaging)\b|\bcontrast\b|\bt1\b|\bt2\b"
            r"|\bflair\b|\bweighted\b|\b(is|was) (this|it|the image) (a|an|taken with|done with)\b.*"
            r"\b(ct|mri?|x-?ray|radiograph|ultrasound|film|scan)\b|\bhow was (this|the) image\b|\bwhat was used to\b"
            r"|^(ct|mri?|x-?ray|ultrasound) or\b|\b(ct|mri?|x-?ray) or (ct|mri?|x-?ray|ultrasound)\b",
        ),
        ("ORGAN", r"\b(what|which) organs?\b|\borgan system\b|\bbody part\b|\bpart of the body\b|\bwhat structure\b"),
        (
            "POS",
            r"^where\b|\bwhere (is|are|was|were|in|on|does|do)\b|\blocat\w*\b|\bwhich (side|lobe|lung|kidney|part"
            r"|region|quadrant|hemisphere|level|segment|vertebra|rib)\b|\bwhat (side|lobe|part|region|quadrant"
            r"|level|segment)\b|\bleft or (the )?right\b|\bright or (the )?left\b|\blaterality\b",
        ),
        (
            "SIZE",
            r"\bsize\b|\bhow (large|big|small|wide|long|thick|tall)\b|\bdimensions?\b|\bmeasure\w*\b|\bdiameter\b"
            r"|\b(enlarged|enlargement|dilated|dilation|dilatation|widened|shrunk\w*|thicken\w*|swollen|swelling)\b"
            r"|\b(larger|smaller|bigger) than\b|\bcm\b|\bmm\b|\bcardiomegaly\b|\bnormal(ly)? sized?\b"
            r"|\bwithin normal (size|limits)\b|\b(large|small|big)\??$",
        ),
        (
            "ABN",
            r"\babnormal\w*\b|\bnormal\b|\bwhat is wrong\b|\bpatholog\w*\b|\bdiagnos\w*\b|\bunremarkable\b"
            r"|\bhealthy\b",
        ),
        ("PRES", r"^what (is|are)(/are)? (the|this|these|those|that)\b"),
        (
            "COLOR",
            r"\bcolou?r\b|\bhyper-?\s?(dense|intense|echoic|attenuat\w*)\b|\bhypo-?\s?(dense|intense|echoic|attenuat\w*)"
            r"\b|\biso-?(dense|intense)\b|\b(density|intensity|signal|echogenicity|attenuation)\b|\benhanc\w*\b"
            r"|\b(bright|dark|white|black|gr[ae]y|radiopaque|radiolucent|lucent|opaque)\b",
        ),
        ("POS", r"\bbilateral\w*\b|\b(on|in) the (left|right)\b|\b(left|right)[- ]sided\b"),
        (
            "PRES",
            r"^(is|are) there\b|^(does|do|did) (the|this|these|it|there)\b|\bevidence of\b|\bpresent\b"
            r"|\b(seen|visible|shown|identified|noted|appreciated)\b|\bdo you see\b|\bcan you see\b|\bany\b"
            r"|^(is|are) (the|this|these|a|an)\b|^(is|are) \w+ (in|on|of|with)\b|^(is|are)\b|^can you\b",
        ),
    )
)


def infer_question_type(question: str) -> str:
    """The question's type code (one of QUESTION_TYPES), from its words alone."""
    text = " ".join(question.lower().replace("\u2019", "'").split())
    for code, pattern in _RULES:
        if pattern.search(text):
            return code
    return "OTHER"


def normalise_label(label: str) -> set[str]:
    """VQA-RAD's label as a set of codes: 'PRES, POS' -> {PRES, POS}; its few typos (PRSE, ATRIB) mended."""
    fixes = {"PRSE": "PRES", "ATRIB": "ATTRIB"}
    return {fixes.get(part.strip().upper(), part.strip().upper()) for part in label.split(",") if part.strip()}
