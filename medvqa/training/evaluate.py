"""Run a predictor over VQA examples and score it, optionally against a blind (blank-image) baseline.

The predictor is any `(image, question) -> answer` callable, so the same harness scores the embedded
model, a vLLM server or a stub. The blind baseline gives the predictor a black image of the same size:
the gap between the two runs shows how much the answers really depend on the image, since a language
model alone answers many VQA-RAD closed questions well from the question's wording.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TypeVar

from PIL import Image, UnidentifiedImageError

from medvqa.errors import InvalidInput
from medvqa.training.data import VQAExample
from medvqa.training.metrics import EvalReport, score

Predictor = Callable[[Image.Image, str], str]
_T = TypeVar("_T")


def load_image(example: VQAExample, *, blind: bool = False) -> Image.Image:
    """The example's image as RGB, or with blind=True an all-black RGB image of the same size."""
    try:
        with Image.open(example.image_path) as image:
            if blind:
                return Image.new("RGB", image.size)
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise InvalidInput(f"question {example.qid}: cannot read image {example.image_path}: {exc}") from exc


def evaluate(
    examples: Sequence[VQAExample], predict: Predictor, *, blind: bool = False, progress: bool = False
) -> EvalReport:
    """Ask `predict` every question and score the answers; exceptions from `predict` propagate.

    Each question is asked once, in order, with a freshly loaded image. An empty answer counts as wrong.
    """
    predictions: list[str] = []
    label = "blind baseline" if blind else "evaluating"
    for example in _progress(examples, enabled=progress, description=label):
        answer = predict(load_image(example, blind=blind), example.question)
        if not isinstance(answer, str):
            raise InvalidInput(f"question {example.qid}: the predictor returned {type(answer).__name__}, not text")
        predictions.append(answer)
    return score(examples, predictions)


def compare_with_blind(examples: Sequence[VQAExample], predict: Predictor, *, progress: bool = False) -> EvalReport:
    """The normal report with the blank-image report nested as `blind` (and the closed-accuracy gain over it)."""
    report = evaluate(examples, predict, progress=progress)
    baseline = evaluate(examples, predict, blind=True, progress=progress)
    return replace(report, blind=baseline)


def _progress(items: Sequence[_T], *, enabled: bool, description: str) -> Iterable[_T]:
    """Wrap in a tqdm bar when asked and tqdm is installed; otherwise iterate silently."""
    if not enabled:
        return items
    try:
        # Imported by name: tqdm ships no type information, and it stays an optional nicety.
        tqdm_auto = importlib.import_module("tqdm.auto")
    except ImportError:
        return items
    bar: Iterable[_T] = tqdm_auto.tqdm(items, total=len(items), desc=description, unit="question")
    return bar
