"""Run a predictor over VQA examples and score it, optionally against blind and shuffled-image baselines.

The predictor is any `(image, question) -> answer` callable, so the same harness scores the embedded
model, a vLLM server or a stub. Two baselines show how much the answers really depend on the image, since a
language model alone answers many VQA-RAD closed questions well from the question's wording:
- blind: the predictor gets a black image of the same size;
- shuffled: the predictor gets another image of the set (every question about one image gets the same other
  image). A model can beat the blind run only because any real image looks unlike a black one; it beats the
  shuffled run only by reading the image it was asked about.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from medvqa.errors import InvalidInput
from medvqa.training.data import VQAExample
from medvqa.training.metrics import EvalReport, Prediction, score

# A predictor answers with text, or with a Prediction that carries its confidence (and abstention).
Predictor = Callable[[Image.Image, str], str | Prediction]
BatchPredictor = Callable[[Sequence[Image.Image], Sequence[str]], Sequence[str | Prediction]]


@dataclass(frozen=True)
class Batched:
    """A predictor that answers `size` questions per call (batched generation); `evaluate` feeds it in chunks.
    Called with one image and question, it is an ordinary predictor."""

    many: BatchPredictor
    size: int = 8

    def __call__(self, image: Image.Image, question: str) -> str | Prediction:
        return self.many([image], [question])[0]


def load_image(example: VQAExample, *, blind: bool = False) -> Image.Image:
    """The example's image as RGB, or with blind=True an all-black RGB image of the same size."""
    try:
        with Image.open(example.image_path) as image:
            if blind:
                return Image.new("RGB", image.size)
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise InvalidInput(f"question {example.qid}: cannot read image {example.image_path}: {exc}") from exc


def other_images(examples: Sequence[VQAExample]) -> dict[Path, Path]:
    """For each image of the set, another one: the sorted distinct images, each mapped half-way round the list.

    Deterministic, and no image maps to itself; empty when the set holds fewer than two images.
    """
    paths = sorted({example.image_path for example in examples})
    if len(paths) < 2:
        return {}
    shift = len(paths) // 2
    return {path: paths[(index + shift) % len(paths)] for index, path in enumerate(paths)}


def evaluate(
    examples: Sequence[VQAExample],
    predict: Predictor,
    *,
    blind: bool = False,
    shuffled: bool = False,
    progress: bool = False,
) -> EvalReport:
    """Ask `predict` every question and score the answers; exceptions from `predict` propagate.

    Each question is asked once, in order, with a freshly loaded image: its own, a black one (`blind`) or the
    image `other_images` gives (`shuffled`). An empty answer counts as wrong.
    """
    if blind and shuffled:
        raise InvalidInput("choose one baseline: blind (black images) or shuffled (other images), not both")
    swap = other_images(examples) if shuffled else {}
    if shuffled and not swap:
        raise InvalidInput("the shuffled baseline needs questions about at least two different images")
    predictions: list[str | Prediction] = []
    label = "blind baseline" if blind else "shuffled baseline" if shuffled else "evaluating"
    size = predict.size if isinstance(predict, Batched) else 1
    bar = _bar(len(examples), enabled=progress, description=label)
    for start in range(0, len(examples), size):
        chunk = examples[start : start + size]
        shown = [replace(e, image_path=swap[e.image_path]) if shuffled else e for e in chunk]
        images = [load_image(example, blind=blind) for example in shown]
        questions = [example.question for example in chunk]
        if isinstance(predict, Batched):
            answers = list(predict.many(images, questions))
        else:
            answers = [predict(images[0], questions[0])]
        if len(answers) != len(chunk):
            raise InvalidInput(f"the predictor gave {len(answers)} answers for {len(chunk)} questions")
        for example, answer in zip(chunk, answers, strict=True):
            if not isinstance(answer, str | Prediction) or not isinstance(getattr(answer, "text", answer), str):
                raise InvalidInput(f"question {example.qid}: the predictor returned {type(answer).__name__}, not text")
            predictions.append(answer)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return score(examples, predictions)


def compare_with_baselines(examples: Sequence[VQAExample], predict: Predictor, *, progress: bool = False) -> EvalReport:
    """The normal report with the baselines nested: `blind` (black images) and, where the set holds two or more
    images, `shuffled` (other images); the report gives the closed-accuracy gain over each."""
    report = evaluate(examples, predict, progress=progress)
    blind = evaluate(examples, predict, blind=True, progress=progress)
    shuffled = evaluate(examples, predict, shuffled=True, progress=progress) if other_images(examples) else None
    return replace(report, blind=blind, shuffled=shuffled)


CONDITIONS = (("own", None), ("blind", "blind"), ("shuffled", "shuffled"))


def write_predictions(report: EvalReport, path: Path) -> int:
    """One JSON line per question and condition (own image, then blind and shuffled where measured): qid,
    condition, question, reference, answer, correct, confidence (and raw_confidence, abstained), answer type,
    question type, organ. Written atomically; returns the number of lines."""
    import json
    import os
    import tempfile

    lines: list[str] = []
    for condition, attribute in CONDITIONS:
        member = report if attribute is None else getattr(report, attribute)
        if member is None:
            continue
        for item in member.examples:
            row = {
                "qid": item.qid,
                "condition": condition,
                "question": item.question,
                "reference": item.reference,
                "answer": item.prediction,
                "correct": item.exact_match,
                "confidence": item.confidence,
                "raw_confidence": item.raw_confidence,
                "abstained": item.abstained,
                "answer_type": item.answer_type,
                "question_type": item.question_type,
                "organ": item.organ,
            }
            lines.append(json.dumps(row, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(prefix=".predictions-", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write("".join(line + "\n" for line in lines))
    os.replace(scratch, path)
    return len(lines)


def _bar(total: int, *, enabled: bool, description: str) -> Any:
    """A tqdm bar over `total` questions when asked and tqdm is installed; otherwise None."""
    if not enabled:
        return None
    try:
        # Imported by name: tqdm ships no type information, and it stays an optional nicety.
        tqdm_auto = importlib.import_module("tqdm.auto")
    except ImportError:
        return None
    return tqdm_auto.tqdm(total=total, desc=description, unit="question")
