"""What a heatmap costs: time per answer without and with its saliency map, on the same questions in one
process, and the sanity checks (Adebayo et al.) of the model, with their time.

    .venv/bin/python bench/heatmap_bench.py [--model DIR] [--questions 30] [--threads 1]

With no --model it uses the model the workbench answers with (the default model under MEDVQA_HOME, built on
first use). Questions come from VQA-RAD's train.jsonl (never the locked test set). Prints one markdown table:
p50 and p90 of the answer alone, the map alone, and answer + map as a ratio to the answer alone (goal: < 2x).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    import torch
    from PIL import Image

    from medvqa.model.generation import answer
    from medvqa.model.loading import load_vlm
    from medvqa.model.saliency import saliency, sanity_check

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from medvqa.config import load_settings
        from medvqa.services.evaluation import base_model_path

        args.model = base_model_path(load_settings())
    loaded = load_vlm(args.model, device="cpu", dtype="float32")
    rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines() if line.strip()]
    rows = rows[:: max(1, len(rows) // args.questions)][: args.questions]
    started = time.perf_counter()
    check = sanity_check(loaded)
    check_seconds = time.perf_counter() - started
    first = Image.open(DATA / rows[0]["image"]).convert("RGB")
    saliency(loaded, first, rows[0]["question"], answer(loaded, first, rows[0]["question"]).token_ids)  # warm-up
    alone, mapped = [], []
    for row in rows:
        image = Image.open(DATA / row["image"]).convert("RGB")
        started = time.perf_counter()
        given = answer(loaded, image, row["question"])
        alone.append(time.perf_counter() - started)
        started = time.perf_counter()
        saliency(loaded, image, row["question"], given.token_ids)
        mapped.append(time.perf_counter() - started)
    ratio = [(a + m) / a for a, m in zip(alone, mapped, strict=True)]
    print(f"\n{args.model.name}, {len(rows)} training questions, CPU, {torch.get_num_threads()} thread(s)\n")
    print("| measure | p50 | p90 |\n|---|---:|---:|")
    for name, values in (("answer alone", alone), ("map alone", mapped)):
        print(f"| {name} | {percentile(values, 0.5) * 1000:.0f} ms | {percentile(values, 0.9) * 1000:.0f} ms |")
    print(f"| answer + map / answer alone | {percentile(ratio, 0.5):.2f}x | {percentile(ratio, 0.9):.2f}x |")
    print(f"\nsanity checks (once per model): {check_seconds:.1f} s; {json.dumps(check.to_json())}")


if __name__ == "__main__":
    main()
