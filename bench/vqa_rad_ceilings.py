"""What VQA-RAD's leak-free split allows: answer-vocabulary ceilings and model-free baselines on test.jsonl.

The default-model issue asks for closed >= 70% and open exact match >= 30% on the 451 test questions, with
closed at least 5 points above the blind baseline. This script measures, without any model, how much of that
the split itself permits, so that a model's figure can be read against it:

- the share of test answers that occur anywhere among the training answers of the same answer type (a model
  that only reproduces training answers, which is what a classifier or a small fine-tuned LM does, cannot
  exceed it);
- the question-only nearest neighbour (word overlap with a training question; no image): a blind baseline;
- the same-image nearest neighbour: the answer of the most similar training question about the *same image*
  (202 of the 203 test images are in train), i.e. what perfect recognition of the image plus memorising its
  training answers buys;
- same-image facts: a closed question answered from what the training rows say about the same image (the
  yes/no of the same-image closed question sharing most content words, else "yes" when a content word of the
  question occurs in one of that image's open answers, else blind); what image-level finding labels mined
  from those rows could teach at best;
- the image-attribute oracle: the question-only baseline, except that every MODALITY, PLANE and ORGAN question
  (what image-level pre-training of a vision tower can learn) is counted as right.

    .venv/bin/python bench/vqa_rad_ceilings.py [--data-dir ../shared/data/vqa-rad]

Only train.jsonl feeds a prediction; test.jsonl is only scored, as every evaluation does.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from medvqa.training.metrics import normalize_answer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad"
ATTRIBUTE_TYPES = {"MODALITY", "PLANE", "ORGAN"}
# Words that say nothing about which question it is; left out of the overlap.
FILLER = frozenset("is are the a an of in on this there be to what which does do image seen shown".split())  # noqa: SIM905

# Also left out when matching findings: they say where or whether, not what.
_GENERIC_WORDS = "there any evidence seen visible patient picture present show shows noted found located side"
GENERIC = FILLER | frozenset(_GENERIC_WORDS.split()) | {"left", "right", "normal", "abnormal"}

Row = dict[str, str]


def words(question: str) -> set[str]:
    return {word for word in normalize_answer(question).split() if word not in FILLER}


def nearest(row: Row, pool: list[Row]) -> Row | None:
    """The pool row whose question shares most words with `row`'s (Jaccard), first one on ties."""
    query = words(row["question"])
    best, best_score = None, -1.0
    for candidate in pool:
        other = words(candidate["question"])
        score = len(query & other) / max(1, len(query | other))
        if score > best_score:
            best, best_score = candidate, score
    return best


def score(rows: list[Row], predict: Callable[[Row], str]) -> tuple[float, float, float]:
    """(closed accuracy, open exact match, overall), exact match after normalisation, every question counted."""
    right = {"CLOSED": 0, "OPEN": 0}
    total = Counter(row["answer_type"] for row in rows)
    for row in rows:
        right[row["answer_type"]] += normalize_answer(predict(row)) == normalize_answer(row["answer"])
    return (
        right["CLOSED"] / total["CLOSED"],
        right["OPEN"] / total["OPEN"],
        (right["CLOSED"] + right["OPEN"]) / len(rows),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DATA)
    args = parser.parse_args()
    load = lambda name: [json.loads(line) for line in (args.data_dir / name).read_text().splitlines() if line]  # noqa: E731
    train, test = load("train.jsonl"), load("test.jsonl")
    by_type = {kind: [row for row in train if row["answer_type"] == kind] for kind in ("CLOSED", "OPEN")}
    by_image: dict[tuple[str, str], list[Row]] = {}
    for row in train:
        by_image.setdefault((row["image"], row["answer_type"]), []).append(row)
    vocabulary = {kind: {normalize_answer(row["answer"]) for row in by_type[kind]} for kind in by_type}
    most_common = {
        kind: Counter(normalize_answer(row["answer"]) for row in by_type[kind]).most_common(1)[0][0] for kind in by_type
    }

    def blind(row: Row) -> str:
        match = nearest(row, by_type[row["answer_type"]])
        return match["answer"] if match else ""

    def same_image(row: Row) -> str:
        match = nearest(row, by_image.get((row["image"], row["answer_type"]), []))
        return match["answer"] if match else blind(row)

    def same_image_facts(row: Row) -> str:
        if row["answer_type"] != "CLOSED":
            return blind(row)
        query = words(row["question"]) - GENERIC
        best, best_overlap = None, 0
        for candidate in by_image.get((row["image"], "CLOSED"), []):
            overlap = len(query & (words(candidate["question"]) - GENERIC))
            if overlap > best_overlap and normalize_answer(candidate["answer"]) in ("yes", "no"):
                best, best_overlap = candidate, overlap
        if best is not None:
            return best["answer"]
        described = {w for other in by_image.get((row["image"], "OPEN"), []) for w in words(other["answer"])}
        return "yes" if query & described and normalize_answer(row["answer"]) in ("yes", "no") else blind(row)

    def attribute_oracle(row: Row) -> str:
        return row["answer"] if row["question_type"] in ATTRIBUTE_TYPES else blind(row)

    def in_vocabulary(row: Row) -> str:
        return row["answer"] if normalize_answer(row["answer"]) in vocabulary[row["answer_type"]] else ""

    rows = [
        ("most common training answer", lambda row: most_common[row["answer_type"]]),
        ("question-only nearest neighbour (blind)", blind),
        ("same-image nearest neighbour", same_image),
        ("same-image facts (closed)", same_image_facts),
        ("image-attribute oracle", attribute_oracle),
        ("answer-vocabulary ceiling", in_vocabulary),
    ]
    counts = Counter(row["answer_type"] for row in test)
    print(f"VQA-RAD test: {len(test)} questions ({counts['CLOSED']} closed, {counts['OPEN']} open); exact match")
    print(f"{'predictor':<42} {'closed':>7} {'open':>7} {'overall':>8}")
    for name, predict in rows:
        closed, open_, overall = score(test, predict)
        print(f"{name:<42} {closed:>7.1%} {open_:>7.1%} {overall:>8.1%}")


if __name__ == "__main__":
    main()
