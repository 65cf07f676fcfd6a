"""VQA examples read from JSON Lines files such as the VQA-RAD splits (`train.jsonl`, `test.jsonl`).

One object per line with `qid`, `image` (a path relative to the file's folder, or absolute), `question`,
`answer`, and optionally `answer_type` (CLOSED/OPEN), `question_type` and `organ`. Every problem is
reported as `InvalidInput` naming the file and line, so a broken evaluation set fails before any model runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from medvqa.errors import InvalidInput
from medvqa.training.metrics import normalize_answer

AnswerType = Literal["CLOSED", "OPEN"]
ANSWER_TYPES: tuple[AnswerType, ...] = ("CLOSED", "OPEN")
# Label used when a file has no question_type / organ (e.g. data exported from reviewed feedback).
UNKNOWN = "UNKNOWN"
_REQUIRED_TEXT = ("qid", "image", "question", "answer")


@dataclass(frozen=True)
class VQAExample:
    """One question about one image, with its reference answer and the labels used to break results down."""

    qid: str
    image_path: Path
    question: str
    answer: str
    answer_type: AnswerType
    question_type: str
    organ: str


def infer_answer_type(answer: str) -> AnswerType:
    """CLOSED for yes/no answers, OPEN otherwise: the VQA-RAD convention when a row carries no answer_type."""
    return "CLOSED" if normalize_answer(answer) in {"yes", "no"} else "OPEN"


def load_vqa_jsonl(path: Path) -> list[VQAExample]:
    """Read every example of a JSON Lines file; image paths resolve against the file's folder.

    Blank lines are skipped. A malformed line, a missing field, a missing image, an unknown answer_type,
    a repeated qid or an empty file raises `InvalidInput` naming the 1-based line number.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidInput(f"cannot read VQA data file {path}: {exc.strerror or exc}") from exc
    examples: list[VQAExample] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        example = _parse_line(line, path.parent.resolve(), where=f"{path} line {number}")
        if example.qid in seen:
            raise InvalidInput(f"{path} line {number}: qid {example.qid!r} appears twice; each question must be unique")
        seen.add(example.qid)
        examples.append(example)
    if not examples:
        raise InvalidInput(f"{path} holds no examples; expected one JSON object per line")
    return examples


def write_vqa_jsonl(examples: Sequence[VQAExample], path: Path) -> None:
    """Write `examples` as a JSON Lines file `load_vqa_jsonl` reads back (image paths written absolute)."""
    rows = (
        {
            "qid": example.qid,
            "image": str(example.image_path),
            "question": example.question,
            "answer": example.answer,
            "answer_type": example.answer_type,
            "question_type": example.question_type,
            "organ": example.organ,
        }
        for example in examples
    )
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _parse_line(line: str, folder: Path, *, where: str) -> VQAExample:
    """Turn one JSON line into a `VQAExample`, checking fields and that the image exists."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{where}: not valid JSON ({exc.msg}); expected one JSON object per line") from exc
    if not isinstance(row, dict):
        raise InvalidInput(f"{where}: expected a JSON object, got {type(row).__name__}")
    fields = {name: _text_field(row, name, where=where) for name in _REQUIRED_TEXT}
    image_path = (folder / fields["image"]).resolve()
    if not image_path.is_file():
        raise InvalidInput(f"{where}: image {fields['image']!r} not found at {image_path}")
    return VQAExample(
        qid=fields["qid"],
        image_path=image_path,
        question=fields["question"],
        answer=fields["answer"],
        answer_type=_answer_type(row.get("answer_type"), fields["answer"], where=where),
        question_type=_label(row.get("question_type"), "question_type", where=where),
        organ=_label(row.get("organ"), "organ", where=where),
    )


def _text_field(row: dict[str, Any], name: str, *, where: str) -> str:
    """A required non-blank field; integer qids are accepted and kept as text."""
    value = row.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and name == "qid":
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{where}: field {name!r} is missing or empty")
    return value.strip()


def _answer_type(value: object, answer: str, *, where: str) -> AnswerType:
    """The given answer_type (case-insensitive), or one inferred from the answer when absent."""
    if value is None:
        return infer_answer_type(answer)
    text = value.strip().upper() if isinstance(value, str) else None
    for answer_type in ANSWER_TYPES:
        if text == answer_type:
            return answer_type
    raise InvalidInput(f"{where}: answer_type {value!r} is not one of CLOSED, OPEN")


def _label(value: object, name: str, *, where: str) -> str:
    """A grouping label kept as written (e.g. 'POS, PRES'), or UNKNOWN when absent or blank."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return UNKNOWN
    if not isinstance(value, str):
        raise InvalidInput(f"{where}: field {name!r} must be text, got {type(value).__name__}")
    return value.strip()
