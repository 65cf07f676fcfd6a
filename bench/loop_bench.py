"""A hospital's first months, played through the services a hospital uses: does each round improve the model?

The data (VQA-RAD, CC0): the locked test set stays test.jsonl. Training images that test.jsonl never shows are
the hospital's new cases; the rest of train.jsonl is what the starting model was trained on. The new cases are
split by image into feedback images (clinicians ask about them) and a hospital hold-out (never fed back: it shows
in-distribution gain). Then, per batch of N reviewed answers:

1. a clinician asks the batch's training questions about their images through `ask` (the live model answers);
2. a reviewer adjudicates each answer through `review.adjudicate` (signed): correct when it matches the
   dataset's answer, else incorrect with the dataset's answer as reference; with `--reviewer-error` (5%) the
   verdict is wrong (a wrong answer passed as correct, so the snapshot learns it; a right one marked incorrect);
3. an ML engineer runs a round (`run_round`: every reviewed answer so far, plus the starting data as replay with
   `--replay`); when the gate passes, the engineer requests promotion and an admin approves (two people);
4. the live model (whichever it is now) is measured: `run_evaluation` on the locked test set (with the shuffled
   and blind baselines) and on the hospital hold-out.

    .venv/bin/python bench/loop_bench.py --start DIR [--batch 250] [--rounds 4] [--reviewer-error 0.05]
                                         [--replay] [--output DIR] [--device cpu|auto]
    .venv/bin/python bench/loop_bench.py --quick --start DIR     # a smoke run (CI): few questions, 2 rounds

--start is the starting model: the default recipe trained on the starting rows only (`--write-start-data FILE`
writes them; train with `python -m medvqa.training.default_recipe --data FILE ...`, see docs/learning_loop.md).
The output folder gets `loop.json`, `loop.md` (the table) and `loop.png` (the curve).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad"
PASSWORD = "loop-bench-password"


@dataclass
class Split:
    start_rows: list[dict[str, Any]]  # what the starting model may have been trained on
    feedback_rows: list[dict[str, Any]]  # training questions about the feedback images, asked in this order
    holdout_rows: list[dict[str, Any]]  # training questions about the hospital hold-out images


def split_data(data: Path, holdout_share: float, seed: int) -> Split:
    """New cases: training images test.jsonl never shows; a share of them (by image) is the hospital hold-out."""
    train = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines() if line.strip()]
    lines = (data / "test.jsonl").read_text().splitlines()
    test_images = {Path(json.loads(line)["image"]).name for line in lines if line.strip()}
    new_images = sorted({Path(row["image"]).name for row in train} - test_images)
    random.Random(seed).shuffle(new_images)
    cut = round(len(new_images) * holdout_share)
    holdout, feedback = set(new_images[:cut]), set(new_images[cut:])
    rows = [dict(row, image=str(data / row["image"])) for row in train]
    start = [row for row in rows if Path(row["image"]).name not in holdout | feedback]
    asked = [row for row in rows if Path(row["image"]).name in feedback]
    random.Random(seed + 1).shuffle(asked)  # cases arrive in no particular order
    kept = [row for row in rows if Path(row["image"]).name in holdout]
    return Split(start, asked, kept)


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@dataclass
class Hospital:
    """The scratch installation: database, accounts, the new cases imported as studies."""

    home: Path
    settings: Any
    db: Any
    actors: dict[str, Any]
    studies: dict[str, int] = field(default_factory=dict)  # image file name -> study id
    held: int = 0  # questions not asked: their image is held for burned-in text


def open_hospital(home: Path, start: Path, locked: Path, rows: list[dict[str, Any]], options: Any) -> Hospital:
    from medvqa.config import load_settings
    from medvqa.db.engine import Database
    from medvqa.db.migrate import upgrade
    from medvqa.imaging.demo import build_demo_files
    from medvqa.services.audit import Actor
    from medvqa.services.images import confirm_no_burned_in_text
    from medvqa.services.review import held_instances
    from medvqa.services.studies import import_paths
    from medvqa.services.users import add_user

    settings = load_settings(
        home=home,
        base_model=start,
        locked_test_set=locked,
        device=options.device,
        round_min_examples=min(options.batch, 50),
        round_base_data=options.replay_file,
    )
    db = Database.from_settings(settings)
    upgrade(db)
    operator = Actor("loop-bench", "admin")
    actors = {}
    for role in ("clinician", "reviewer", "ml_engineer", "admin"):
        user = add_user(db, operator, f"loop.{role}", PASSWORD, role)
        actors[role] = Actor(user.username, role, user.id)
    hospital = Hospital(home, settings, db, actors)
    # Only the images the hospital sees become DICOM studies: a folder of links to them, and the training file
    # the demo labels modality and body part from.
    subset = home / "new-cases"
    (subset / "images").mkdir(parents=True, exist_ok=True)
    (subset / "train.jsonl").unlink(missing_ok=True)
    (subset / "train.jsonl").symlink_to(DATA / "train.jsonl")
    for image in sorted({Path(row["image"]) for row in rows}):
        link = subset / "images" / image.name
        if not link.exists():
            link.symlink_to(image)
    files = build_demo_files(subset, home / "demo-dicom", settings.import_max_pixels)
    for file in files:  # one import per image, so each image's study is known
        hospital.studies[file.stem] = import_paths(db, operator, [file], settings).study_ids[0]
    # Teaching images carry arrows and side markers that the burned-in text detector holds: the reviewer looks at
    # them on the Review page and confirms there is no identifying text (VQA-RAD is de-identified, CC0).
    reviewer = actors["reviewer"]
    held = [item["instance_id"] for item in held_instances(db, reviewer)]
    if held:
        confirm_no_burned_in_text(db, reviewer, held)
    return hospital


def review_batch(
    hospital: Hospital, model: Any, rows: list[dict[str, Any]], error: float, rng: random.Random
) -> float | None:
    """Ask each question through `ask`, adjudicate through `review`; returns the share of answers that were right."""
    from medvqa.errors import HeldForReview
    from medvqa.services.ask import ask
    from medvqa.services.review import ReviewInput, adjudicate
    from medvqa.training.metrics import exact_match

    right = asked = 0
    for row in rows:
        study_id = hospital.studies[Path(row["image"]).stem]
        try:
            result = ask(hospital.db, hospital.actors["clinician"], hospital.settings, model, study_id, row["question"])
        except HeldForReview:  # burned-in text found: never shown to a model before a reviewer confirms it
            hospital.held += 1
            continue
        asked += 1
        correct = exact_match(result.text, row["answer"])
        right += correct
        verdict_right = rng.random() >= error
        judged_correct = correct if verdict_right else not correct
        reference = None if judged_correct else row["answer"]
        item = ReviewInput(
            result.answer_id, "correct" if judged_correct else "incorrect", "review", PASSWORD, reference
        )
        adjudicate(hospital.db, hospital.actors["reviewer"], item)
    return right / asked if asked else None


def measure(hospital: Hospital, locked: Path, holdout: Path, limit: int | None) -> dict[str, Any]:
    """The live model now: locked test set with baselines, and the hospital hold-out."""
    from medvqa.services.evaluation import run_evaluation

    test = run_evaluation(hospital.db, hospital.settings, locked, limit=limit).to_json()
    held = run_evaluation(hospital.db, hospital.settings, holdout, limit=limit, baselines=False).to_json()
    closed = (test.get("calibration") or {}).get("closed") or {}
    return {
        "test_closed": test["closed_accuracy"],
        "test_open_em": test["open_exact_match"],
        "test_overall": test["overall_accuracy"],
        "gain_over_shuffled": test.get("closed_accuracy_gain_over_shuffled"),
        "holdout_overall": held["overall_accuracy"],
        "test_closed_ece": closed.get("ece"),
    }


def play(options: Any) -> list[dict[str, Any]]:
    from medvqa.services.ask import load_answering_model
    from medvqa.services.promotion import approve_promotion
    from medvqa.services.rounds import RoundOptions, request_round_promotion, run_round
    from medvqa.training.train import TrainSettings

    split = split_data(DATA, options.holdout_share, options.seed)
    home = options.home or Path(tempfile.mkdtemp(prefix="medvqa-loop-"))
    locked = write_jsonl(
        [
            dict(json.loads(line), image=str(DATA / json.loads(line)["image"]))
            for line in (DATA / "test.jsonl").read_text().splitlines()
            if line.strip()
        ][: options.test_limit],
        home / "locked-test.jsonl",
    )
    holdout = write_jsonl(split.holdout_rows[: options.test_limit], home / "hospital-holdout.jsonl")
    options.replay_file = write_jsonl(split.start_rows, home / "start-data.jsonl") if options.replay else None
    asked = split.feedback_rows[: options.batch * options.rounds]
    hospital = open_hospital(home, options.start, locked, asked + split.holdout_rows[: options.test_limit], options)
    rng = random.Random(options.seed)
    rows = [{"round": 0, "reviewed": 0, "gate": "-", "promoted": False, "seconds": 0.0, "batch_accuracy": None}]
    rows[0] |= measure(hospital, locked, holdout, options.test_limit)
    print(_line(rows[0]), flush=True)
    model = load_answering_model(hospital.db, hospital.settings)
    train = TrainSettings(epochs=options.epochs, max_steps=options.max_steps)
    for number in range(1, options.rounds + 1):
        started = time.perf_counter()
        batch = asked[(number - 1) * options.batch : number * options.batch]
        accuracy = review_batch(hospital, model, batch, options.reviewer_error, rng)
        engineer, admin = hospital.actors["ml_engineer"], hospital.actors["admin"]
        outcome = run_round(hospital.db, engineer, hospital.settings, RoundOptions(train=train))
        if outcome.gate_passed:
            request_round_promotion(hospital.db, engineer, outcome.adapter_id, f"loop bench round {number}")
            approve_promotion(hospital.db, admin, outcome.adapter_id)
            model = load_answering_model(hospital.db, hospital.settings)
        row = {
            "round": number,
            "reviewed": number * options.batch,
            "gate": "passed" if outcome.gate_passed else "failed: " + "; ".join(outcome.gate_reasons)[:120],
            "promoted": outcome.gate_passed,
            "batch_accuracy": accuracy,
            "held_for_review": hospital.held,
        }
        row |= measure(hospital, locked, holdout, options.test_limit)
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        print(_line(row), flush=True)
    hospital.db.dispose()
    return rows


COLUMNS = [
    ("round", "round", "{}"),
    ("reviewed", "reviewed answers", "{}"),
    ("batch_accuracy", "live model on the batch", "{:.1%}"),
    ("gate", "gate", "{}"),
    ("test_closed", "test closed", "{:.1%}"),
    ("test_open_em", "test open EM", "{:.1%}"),
    ("test_overall", "test overall", "{:.1%}"),
    ("gain_over_shuffled", "closed gain over shuffled", "{:+.1%}"),
    ("holdout_overall", "hospital hold-out overall", "{:.1%}"),
    ("test_closed_ece", "test closed ECE", "{:.3f}"),
    ("seconds", "wall s", "{:.0f}"),
]


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def _line(row: dict[str, Any]) -> str:
    return "| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in COLUMNS) + " |"


def table(rows: list[dict[str, Any]]) -> str:
    header = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    return "\n".join([header, "|" + "---|" * len(COLUMNS), *(_line(row) for row in rows)]) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axis = plt.subplots(figsize=(6.4, 4.2))
    rounds = [row["round"] for row in rows]
    for key, label in (
        ("test_overall", "locked test, overall"),
        ("test_closed", "locked test, closed"),
        ("test_open_em", "locked test, open EM"),
        ("holdout_overall", "hospital hold-out, overall"),
    ):
        axis.plot(rounds, [row[key] for row in rows], marker="o", label=label)
    for row in rows[1:]:
        if not row["promoted"]:
            axis.axvline(row["round"], color="#cccccc", linestyle=":", linewidth=1)
    axis.set(xlabel="round (dotted: the gate refused the candidate)", ylabel="accuracy", ylim=(0, 1))
    axis.set_xticks(rounds)
    axis.set_title(title, fontsize="small")
    axis.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", type=Path, help="The starting model (see above).")
    parser.add_argument("--batch", type=int, default=250, help="Reviewed answers per round.")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--reviewer-error", type=float, default=0.05, help="Share of wrong verdicts.")
    parser.add_argument("--replay", action="store_true", help="Mix the starting data into every round.")
    parser.add_argument("--holdout-share", type=float, default=0.2, help="Share of new images held out.")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--test-limit", type=int, default=None, help="Only the first N test / hold-out questions.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", type=Path, help="Scratch MEDVQA_HOME (default: a new temp folder).")
    parser.add_argument("--output", type=Path, default=Path("loop-bench"))
    parser.add_argument("--write-start-data", type=Path, help="Write the starting rows to this file and stop.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: batch 12, 2 rounds, 12 test questions.")
    options = parser.parse_args()
    if options.write_start_data:
        rows = split_data(DATA, options.holdout_share, options.seed).start_rows
        write_jsonl(rows, options.write_start_data)
        print(f"{len(rows)} starting rows -> {options.write_start_data}")
        return
    if options.start is None:
        parser.error("--start DIR is required (the starting model)")
    if options.quick:
        options.batch, options.rounds, options.max_steps, options.test_limit = 12, 2, 2, options.test_limit or 12
    import torch

    torch.set_num_threads(2)
    started = time.perf_counter()
    rows = play(options)
    options.output.mkdir(parents=True, exist_ok=True)
    settings = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in vars(options).items()
        if key not in ("output",)
    }
    (options.output / "loop.json").write_text(json.dumps({"settings": settings, "rounds": rows}, indent=2) + "\n")
    (options.output / "loop.md").write_text(table(rows))
    title = f"{options.start.name}: batches of {options.batch}, reviewer error {options.reviewer_error:.0%}"
    title += ", replay on" if options.replay else ", replay off"
    plot(rows, options.output / "loop.png", title)
    print(f"\n{table(rows)}\ntotal {time.perf_counter() - started:.0f} s; {options.output}/loop.md, loop.png")


if __name__ == "__main__":
    main()
