"""Questions per second of scoring (what `medvqa eval`, `medvqa calibrate` and rounds do) one question at a time
against batched greedy generation, in one process on the same questions, with a check that every batch size
gives the same answers.

    .venv/bin/python bench/eval_batch_bench.py [--model DIR] [--data FILE.jsonl] [--limit 64]
                                               [--batch-sizes 1,8,16] [--threads 2]

--model defaults to the shipped default model (built under a scratch MEDVQA_HOME on first use); --data to the
first --limit questions of VQA-RAD test.jsonl (only timed here: nothing is tuned on it). Prints a markdown table:
batch size, wall seconds, questions per second, speed-up over batch size 1, answers identical to batch size 1.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="Checkpoint folder; default: the shipped default model.")
    parser.add_argument("--data", type=Path, default=DATA / "test.jsonl")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from medvqa.model.loading import load_vlm
    from medvqa.services.evaluation import EvaluatedModel, calibrated_predictor
    from medvqa.training.data import load_vqa_jsonl
    from medvqa.training.evaluate import evaluate

    torch.set_num_threads(args.threads)
    model_dir = args.model
    if model_dir is None:
        from medvqa.model.default_weights import ensure_default_model

        model_dir = ensure_default_model(Path(tempfile.gettempdir()) / "medvqa-bench-home")
    loaded = load_vlm(model_dir, device="cpu")
    examples = load_vqa_jsonl(args.data)[: args.limit]
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    evaluate(examples[:2], calibrated_predictor(EvaluatedModel(loaded, model_dir, None, None, None), 2))  # warm-up
    rows, reference = [], None
    for size in sizes:
        predict = calibrated_predictor(EvaluatedModel(loaded, model_dir, None, None, None), size)
        start = time.perf_counter()
        report = evaluate(examples, predict)
        seconds = time.perf_counter() - start
        answers = [item.prediction for item in report.examples]
        reference = reference or (seconds, answers)
        rows.append((size, seconds, len(examples) / seconds, reference[0] / seconds, answers == reference[1]))
    print(f"{len(examples)} questions of {args.data.name}, {loaded.model_ref}, {args.threads} threads\n")
    print("| batch size | wall s | questions/s | speed-up | same answers as batch 1 |")
    print("|---:|---:|---:|---:|---|")
    for size, seconds, rate, speedup, same in rows:
        print(f"| {size} | {seconds:.1f} | {rate:.2f} | {speedup:.2f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
