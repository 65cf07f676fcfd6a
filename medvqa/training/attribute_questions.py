"""Stage-2 questions that tie what the tower learnt in stage 0 (modality, plane) to the answers' wording.

Stage 0 teaches the tower to tell a CT from an MRI; the language model still has to learn to read that for
every way a radiologist asks. VQA-RAD asks few such questions per image (84 images have a known modality),
so the model mostly sees "What modality is this?" on the images where someone asked it, and learns the
closed forms ("Is this an MRI?", "Is this a CT or an MRI?") from a handful of rows. This module moves the
training set's own attribute questions onto the other training images whose attribute is known (from
`vision_pretrain.image_labels`): a question asked about one MRI is asked again about other CTs and MRIs, with
the answer those images' labels give. Only wording from the training file and labels from the training file
are used. Frontal radiographs are only asked "no" questions: their labels cannot tell PA from AP.

To inspect the rows, or to score a model on them with `medvqa eval --data`:

    .venv/bin/python -m medvqa.training.attribute_questions --data train.jsonl --output moved.jsonl [--seed 0]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medvqa.training.data import AnswerType, VQAExample, load_vqa_jsonl, write_vqa_jsonl
from medvqa.training.metrics import normalize_answer
from medvqa.training.vision_pretrain import ATTRIBUTES, IGNORE, KEYWORDS, image_labels, named_classes

# The classes a moved question may name or answer, with the answer's wording (VQA-RAD's own, normalised).
ANSWERS: dict[str, dict[str, str]] = {
    "modality": {"ct": "CT", "mri": "MRI", "xray": "X-ray", "ultrasound": "ultrasound"},
    "plane": {"axial": "axial", "coronal": "coronal", "sagittal": "sagittal"},
}
QUESTION_TYPES = {"modality": "MODALITY", "plane": "PLANE"}
# Words that may stand beside the class in a question that asks only about the class.
_NEUTRAL_WORDS = (
    "is was this that the a an image images scan film view plane section cut picture taken in of with by on via it",
    "or does do done shown seen what which kind type imaging modality used to take acquire acquired obtain obtained",
)
_NEUTRAL = frozenset(word for line in _NEUTRAL_WORDS for word in line.split())


@dataclass
class _Pools:
    """Training questions, by what they ask: open (answer is a class), yes/no naming one class, A-or-B."""

    open: list[str] = field(default_factory=list)
    yes_no: dict[str, list[str]] = field(default_factory=dict)
    choice: list[tuple[str, frozenset[str]]] = field(default_factory=list)


def _class_words(attribute: str) -> set[str]:
    return {word for words in KEYWORDS[attribute].values() for phrase in words for word in phrase.split()}


def _pools(examples: Sequence[VQAExample], attribute: str) -> _Pools:
    pools = _Pools()
    allowed = _NEUTRAL | _class_words(attribute)
    surface = {normalize_answer(text): name for name, text in ANSWERS[attribute].items()}
    seen: set[str] = set()
    for example in examples:
        question = example.question.strip()
        words = set(normalize_answer(question).split())
        if question in seen or not words <= allowed:
            continue
        seen.add(question)
        named = named_classes(attribute, question)
        answer = normalize_answer(example.answer)
        if not named and answer in surface:
            pools.open.append(question)
        elif len(named) == 1 and answer in ("yes", "no") and named <= ANSWERS[attribute].keys():
            pools.yes_no.setdefault(named.pop(), []).append(question)
        elif len(named) == 2 and named <= ANSWERS[attribute].keys() and answer in surface:
            pools.choice.append((question, frozenset(named)))
    return pools


def attribute_questions(
    examples: Sequence[VQAExample], seed: int = 0, *, every_class: bool = False
) -> list[VQAExample]:
    """New training rows: per image with a known modality or plane, one open, one yes, one no and one A-or-B
    question (where the training file has such a wording), drawn from `examples` and answered by the label.

    With `every_class`, each image is also asked a yes/no question naming every other class (answer "no"),
    each balanced by one more question naming its own class (answer "yes", where there is such a wording):
    the closed form is where the language model fails to compare what it sees with the class named.

    Deterministic for a given `seed` and input order. With `every_class` (the recipe's default,
    `--attribute-questions 2`) the rows are those the shipped weights trained on; without it those of the
    package before them. The rows' qids start with "moved-". A drawn question may be one the image already
    has in `examples` (it then simply counts twice).
    """
    labels = image_labels(examples)
    organs = {example.image_path: example.organ for example in examples}
    rng = random.Random(seed)
    added: list[VQAExample] = []

    def add(path: Path, attribute: str, question: str, answer: str) -> None:
        qid = f"moved-{attribute}-{len(added)}"
        answer_type: AnswerType = "CLOSED" if normalize_answer(answer) in ("yes", "no") else "OPEN"
        added.append(VQAExample(qid, path, question, answer, answer_type, QUESTION_TYPES[attribute], organs[path]))

    for attribute in ANSWERS:
        pools = _pools(examples, attribute)
        for path in sorted(labels, key=str):
            index = labels[path][attribute]
            if index == IGNORE:
                continue
            label = ATTRIBUTES[attribute][index]
            known = label in ANSWERS[attribute]
            if known and pools.open:
                add(path, attribute, rng.choice(pools.open), ANSWERS[attribute][label])
            if known and pools.yes_no.get(label):
                add(path, attribute, rng.choice(pools.yes_no[label]), "yes")
            others = sorted(name for name in pools.yes_no if name != label)
            if others:
                named = rng.choice(others)
                add(path, attribute, rng.choice(pools.yes_no[named]), "no")
                for other in (name for name in others if every_class and name != named):
                    add(path, attribute, rng.choice(pools.yes_no[other]), "no")
                    if pools.yes_no.get(label):
                        add(path, attribute, rng.choice(pools.yes_no[label]), "yes")
            choices = [question for question, pair in pools.choice if label in pair]
            if known and choices:
                add(path, attribute, rng.choice(choices), ANSWERS[attribute][label])
    return added


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the moved questions of a training file as a VQA jsonl file."""
    parser = argparse.ArgumentParser(
        prog="python -m medvqa.training.attribute_questions", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--data", type=Path, required=True, help="Training VQA jsonl (VQA-RAD train.jsonl).")
    parser.add_argument("--output", type=Path, required=True, help="Where to write the moved questions.")
    parser.add_argument("--seed", type=int, default=0, help="The recipe's seed (default 0, as shipped).")
    parser.add_argument(
        "--every-class",
        action="store_true",
        help="Also ask about every other class (the recipe's --attribute-questions 2).",
    )
    args = parser.parse_args(argv)
    rows = attribute_questions(load_vqa_jsonl(args.data), args.seed, every_class=args.every_class)
    write_vqa_jsonl(rows, args.output)
    print(f"{len(rows)} moved questions written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
