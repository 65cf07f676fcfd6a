"""Wall time and peak memory of one fine-tuning round on this machine, for a snapshot of N reviewed answers.

Setup (not timed): a scratch MEDVQA_HOME with the VQA-RAD images imported as demo studies (one patient each),
N answers recorded on questions from VQA-RAD train.jsonl, each adjudicated by a reviewer whose reference answer
is the dataset's, and a locked test set of train.jsonl questions about other images (the round's leak check
would refuse test.jsonl, whose images are also train images). Then, each in a fresh process:

- the round: `medvqa.services.rounds.run_round` (snapshot, leak check, training, scoring the candidate and the
  base on the locked test set and the validation split, paired comparison, records and audit);
- the baseline: `train_adapter` alone on the snapshot's training file with the same settings: what any
  fine-tuning costs, so `round / baseline` is the price of the round's controls.

    .venv/bin/python bench/round_bench.py [--examples 500] [--test-questions 100] [--base DIR] [--epochs 1]
                                          [--device cpu|auto]

--base defaults to the workbench's default model (built under the scratch home on first use). On a GPU machine
run it with `--device auto`: training goes to the GPU either way (the Trainer's choice), scoring follows
--device, and the table adds each job's peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad"
PASSWORD = "bench-password-123"


def _settings(home: Path, locked: Path, device: str = "cpu") -> Any:
    from medvqa.config import load_settings

    return load_settings(home=home, locked_test_set=locked, device=device, round_min_examples=10)


def prepare(home: Path, examples: int, test_questions: int) -> Path:
    """Import the images, record and adjudicate `examples` answers; write the locked test set; return its path."""
    from sqlalchemy import select

    from medvqa.db import Series
    from medvqa.db.engine import Database
    from medvqa.db.migrate import upgrade
    from medvqa.imaging.demo import build_demo_files
    from medvqa.services.answers import AnswerRecord, record_answer
    from medvqa.services.audit import Actor
    from medvqa.services.images import confirm_no_burned_in_text, model_input
    from medvqa.services.review import ReviewInput, adjudicate, held_instances
    from medvqa.services.studies import import_paths
    from medvqa.services.users import add_user

    rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines() if line.strip()]
    images = sorted({row["image"] for row in rows})
    held = set(images[:: max(2, len(images) // 60)])  # about 60 images only the locked test set asks about
    locked = home / "locked-test.jsonl"
    test_rows = [dict(row, image=str(DATA / row["image"])) for row in rows if row["image"] in held][:test_questions]
    locked.write_text("".join(json.dumps(row) + "\n" for row in test_rows))
    settings = _settings(home, locked)
    db = Database.from_settings(settings)
    upgrade(db)
    operator = Actor("bench", "admin")
    files = build_demo_files(DATA, home / "demo-dicom", settings.import_max_pixels)
    clinician = add_user(db, operator, "bench.clinician", PASSWORD, "clinician")
    reviewer = add_user(db, operator, "bench.reviewer", PASSWORD, "reviewer")
    asker, judge = (
        Actor(clinician.username, "clinician", clinician.id),
        Actor(reviewer.username, "reviewer", reviewer.id),
    )
    held_stems = {Path(image).stem for image in held}
    imported: dict[str, int] = {}
    for file in files:  # one import per image: the study of each image is known without reading tags back
        if file.stem not in held_stems:
            imported[file.stem] = import_paths(db, operator, [file], settings).study_ids[0]
    # Teaching images carry arrows and side markers that the burned-in text detector holds: the reviewer looks at
    # them (the Review page's service) and confirms there is no identifying text; VQA-RAD is de-identified, CC0.
    waiting = [item["instance_id"] for item in held_instances(db, judge)]
    if waiting:
        confirm_no_burned_in_text(db, judge, waiting)
    by_image: dict[str, tuple[int, int, Any]] = {}
    for stem, study_id in imported.items():
        with db.read_session() as session:
            series_id = session.scalars(select(Series.id).where(Series.study_id == study_id)).one()
        # what `ask` would show the model, computed once per image (its questions share it)
        by_image[stem] = (study_id, series_id, model_input(db, asker, series_id, settings))
    chosen = [row for row in rows if row["image"] not in held][:examples]
    recorded = 0
    for row in chosen:
        if Path(row["image"]).stem not in by_image:
            continue
        study_id, series_id, prepared = by_image[Path(row["image"]).stem]
        answer = AnswerRecord(
            text="yes",  # what a naive model says; the reviewer's reference answer replaces it in the snapshot
            model_ref="bench@000000000000",
            prompt_version="vqa-v1",
            preprocess_hash=prepared.preprocess_hash,
            backend="transformers",
            latency_ms=1.0,
        )
        stored = record_answer(
            db, asker, study_id, row["question"], answer, series_id=series_id, image_selection=prepared.selection
        )
        verdict = "correct" if row["answer"].strip().lower() == "yes" else "incorrect"
        adjudicate(db, judge, ReviewInput(stored.id, verdict, "review", PASSWORD, reference_answer=row["answer"]))
        recorded += 1
    db.dispose()
    if recorded < examples:
        raise SystemExit(f"only {recorded} answers could be matched to imported studies (wanted {examples})")
    return locked


def run_round_job(home: str, locked: str, base: str | None, epochs: float, device: str) -> dict[str, Any]:
    import torch

    from medvqa.db.engine import Database
    from medvqa.services.audit import Actor
    from medvqa.services.rounds import RoundOptions, run_round
    from medvqa.training.train import TrainSettings

    torch.set_num_threads(2)
    settings = _settings(Path(home), Path(locked), device)
    db = Database.from_settings(settings)
    engineer = Actor("bench.engineer", "ml_engineer")
    options = RoundOptions(train=TrainSettings(epochs=epochs), base_model=Path(base) if base else None)
    started = time.perf_counter()
    outcome = run_round(db, engineer, settings, options)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, **_peaks(), "dataset_id": outcome.dataset_id, "gate": outcome.gate_passed}


def baseline_job(home: str, base: str | None, epochs: float) -> dict[str, Any]:
    import torch

    from medvqa.model.adapters import LoraSettings
    from medvqa.training.train import TrainSettings, train_adapter

    torch.set_num_threads(2)
    data = max(Path(home, "datasets").rglob("train.jsonl"), key=lambda p: p.stat().st_mtime)
    model = Path(base) if base else _default_model(Path(home))
    started = time.perf_counter()
    train_adapter(model, data, Path(home) / "baseline-adapter", LoraSettings(), TrainSettings(epochs=epochs))
    return {"seconds": time.perf_counter() - started, **_peaks()}


def _default_model(home: Path) -> Path:
    from medvqa.model.default_weights import ensure_default_model

    return ensure_default_model(home)


def _peaks() -> dict[str, float | None]:
    """Peak resident memory of this process (Linux reports KiB), and peak GPU memory allocated when on CUDA."""
    import torch

    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "gpu_peak_mib": gpu}


def in_fresh_process(function: Any, *args: Any) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        result: dict[str, Any] = pool.submit(function, *args).result()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=500, help="Reviewed answers in the snapshot.")
    parser.add_argument("--test-questions", type=int, default=100, help="Questions in the locked test set.")
    parser.add_argument("--base", type=Path, default=None, help="Base model; default: the workbench's.")
    parser.add_argument("--epochs", type=float, default=1.0, help="Training epochs of the round and the baseline.")
    parser.add_argument("--home", type=Path, default=None, help="Scratch MEDVQA_HOME (default: a temp folder).")
    parser.add_argument("--device", default="cpu", help="Where the round scores answers: cpu, auto, cuda.")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="medvqa-round-bench-"))
    started = time.perf_counter()
    locked = prepare(home, args.examples, args.test_questions)
    print(f"setup: {time.perf_counter() - started:.0f} s ({args.examples} reviewed answers, home {home})")
    base = str(args.base) if args.base else None
    round_ = in_fresh_process(run_round_job, str(home), str(locked), base, args.epochs, args.device)
    baseline = in_fresh_process(baseline_job, str(home), base, args.epochs)
    rows = [
        ("round (snapshot, train, score candidate and base, records)", round_),
        ("baseline: train_adapter alone on the snapshot", baseline),
    ]
    shape = f"{args.examples} reviewed answers, locked test {args.test_questions} questions, {args.epochs:g} epochs"
    print(f"\nsnapshot {shape}")
    gpu = round_["gpu_peak_mib"] is not None
    print("| job | wall s | peak RSS MiB |" + (" peak GPU MiB |\n|---|---:|---:|---:|" if gpu else "\n|---|---:|---:|"))
    for name, job in rows:
        print(
            f"| {name} | {job['seconds']:.0f} | {job['peak_mib']:.0f} |"
            + (f" {job['gpu_peak_mib']:.0f} |" if gpu else "")
        )
    ratio_s, ratio_m = round_["seconds"] / baseline["seconds"], round_["peak_mib"] / baseline["peak_mib"]
    ratio_g = f" {round_['gpu_peak_mib'] / baseline['gpu_peak_mib']:.2f}x |" if gpu else ""
    print(f"| round / baseline | {ratio_s:.2f}x | {ratio_m:.2f}x |" + ratio_g)


if __name__ == "__main__":
    main()
