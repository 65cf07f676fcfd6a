"""How well the rules that type free-text questions (medvqa/services/question_types.py) agree with VQA-RAD's own
question-type labels, on the training questions (the rules were written against these; the locked test set is
never read). A question counts as agreeing when the inferred code is one of its labels; VQA-RAD's ATTRIB has no
rule (it is a catch-all of attributes), so its questions can only agree as OTHER, which the table shows apart.

    .venv/bin/python bench/question_type_agreement.py [--data ../shared/data/vqa-rad/train.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medvqa.services.question_types import QUESTION_TYPES, infer_question_type, normalise_label

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad" / "train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT)
    args = parser.parse_args()
    if "test" in args.data.name:
        sys.exit("the locked test set is not used to measure or tune the rules: give train.jsonl")
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    agree, per_label, predicted = 0, Counter[str](), Counter[str]()
    confusion: Counter[tuple[str, str]] = Counter()
    hits: Counter[str] = Counter()
    for row in rows:
        labels = normalise_label(str(row.get("question_type", "")))
        guess = infer_question_type(str(row["question"]))
        predicted[guess] += 1
        ok = guess in labels or (guess == "OTHER" and labels <= {"ATTRIB", "OTHER"})
        agree += ok
        for label in labels:
            per_label[label] += 1
            hits[label] += guess == label or (label == "ATTRIB" and guess == "OTHER")
        if not ok:
            confusion[(",".join(sorted(labels)), guess)] += 1
    print(f"\n{args.data.name}: {len(rows)} questions; rules agree with VQA-RAD's label on {agree / len(rows):.1%}\n")
    print("| VQA-RAD label | questions | inferred as that label | recall |")
    print("|---|---:|---:|---:|")
    for label, count in per_label.most_common():
        print(f"| {label} | {count} | {hits[label]} | {hits[label] / count:.0%} |")
    print("\n| inferred | questions |\n|---|---:|")
    for code in QUESTION_TYPES:
        print(f"| {code} | {predicted[code]} |")
    print("\nMost common disagreements (label -> inferred):")
    for (label, guess), count in confusion.most_common(8):
        print(f"- {label} -> {guess}: {count}")


if __name__ == "__main__":
    main()
