"""Versioned prompt templates and the chat messages built from them.

The instructions live in `prompts/<version>.json`, one file per version, so every stored answer can name the
exact prompt that produced it. The clinician's question is data: it is cleaned (control characters removed,
whitespace collapsed, length bounded) and placed in its own text item, never formatted into the instructions.
Nothing from DICOM tags reaches a prompt: there is no parameter that could carry it.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass
from importlib import resources
from typing import Any

from medvqa.errors import InvalidInput, NotFound

DEFAULT_PROMPT_VERSION = "vqa-v1"
_VERSION_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{0,63}")
# First words of a yes/no question; "Is it A or B?" asks for a choice and is excluded below.
_AUXILIARIES = ("is", "are", "am", "was", "were", "do", "does", "did", "has", "have", "had")
_MODALS = ("can", "could", "will", "would", "should", "shall", "may", "might", "must")
_CLOSED_OPENERS = frozenset(
    [*_AUXILIARIES, *_MODALS]
    + [word + "n't" for word in (*_AUXILIARIES, "could", "would", "should", "must")]
    + ["can't", "won't", "shan't"]
)


@dataclass(frozen=True)
class PromptTemplate:
    """One version of the instructions and the limits that go with them."""

    version: str  # e.g. "vqa-v1"; recorded with every answer
    system: str  # the instructions, sent as the system turn (or folded into the user turn where none exists)
    max_question_chars: int  # longer questions are refused, not truncated
    closed_answers: tuple[str, ...]  # the answers of a closed question, positive first: ("yes", "no")


def load_prompt(version: str = DEFAULT_PROMPT_VERSION) -> PromptTemplate:
    """Read the prompt template `version` shipped in medvqa/model/prompts/."""
    if not _VERSION_PATTERN.fullmatch(version):
        raise InvalidInput(f"Prompt version {version!r} is not a valid name (lower-case letters, digits, '.', '-').")
    resource = resources.files("medvqa.model").joinpath("prompts", f"{version}.json")
    if not resource.is_file():
        raise NotFound(f"No prompt template {version!r}; the shipped versions are in medvqa/model/prompts/.")
    data = json.loads(resource.read_text(encoding="utf-8"))
    if data.get("version") != version:
        raise InvalidInput(f"Prompt file {version}.json declares version {data.get('version')!r}; they must agree.")
    answers = tuple(str(answer) for answer in data.get("closed_answers", ()))
    limit = int(data["max_question_chars"])
    if limit < 1 or len(answers) not in (0, 2) or not str(data["system"]).strip():
        raise InvalidInput(f"Prompt file {version}.json is malformed (system, max_question_chars, closed_answers).")
    return PromptTemplate(version=version, system=str(data["system"]), max_question_chars=limit, closed_answers=answers)


def normalize_question(question: str, max_chars: int) -> str:
    """The question as sent to the model: control characters removed, whitespace collapsed, length checked."""
    if not isinstance(question, str):
        raise InvalidInput("The question must be text.")
    cleaned = []
    for char in unicodedata.normalize("NFC", question):
        category = unicodedata.category(char)
        if category == "Cc":  # tabs, newlines, NUL, ESC...: a word boundary at most
            cleaned.append(" ")
        elif not category.startswith("C"):  # drops format (bidi overrides, zero-width), surrogate, private chars
            cleaned.append(char)
    text = " ".join("".join(cleaned).split())
    if not text:
        raise InvalidInput("The question is empty; type a question about the image.")
    if len(text) > max_chars:
        raise InvalidInput(f"The question is {len(text)} characters long; the limit is {max_chars}. Shorten it.")
    return text


def build_messages(
    template: PromptTemplate,
    question: str,
    *,
    system_role: bool = True,
    reserved: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Chat messages for one image and one question, in the format processors' chat templates take.

    With `system_role` the instructions are a system turn; without it (templates that reject or drop a system
    turn) they are the first text item of the user turn, before the image, still apart from the question item.
    `reserved` are the tokenizer's control strings (e.g. "<image>"): a question containing one is refused,
    since it would be read as model markup rather than as text.
    """
    text = normalize_question(question, template.max_question_chars)
    clashes = sorted(token for token in reserved if token and token in text)
    if clashes:
        raise InvalidInput(f"The question contains {clashes[0]!r}, which the model reserves for its markup; rephrase.")
    instructions = {"type": "text", "text": template.system}
    image_and_question: list[dict[str, Any]] = [{"type": "image"}, {"type": "text", "text": text}]
    if not system_role:
        return [{"role": "user", "content": [instructions, *image_and_question]}]
    return [{"role": "system", "content": [instructions]}, {"role": "user", "content": image_and_question}]


def is_closed_question(question: str) -> bool:
    """Whether the question asks for yes or no ("Is there a fracture?"), not a choice or a description."""
    words = re.findall(r"[a-z']+", question.lower().replace("\u2019", "'"))
    if not words:
        return False
    return words[0] in _CLOSED_OPENERS and "or" not in words[1:]
