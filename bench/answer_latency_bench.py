"""Answer latency of a model on VQA-RAD test questions, with cold load reported separately.

Loads the model once (the cold load: weights from disk to a ready model, timed), answers a warm-up question,
then answers every selected question with `medvqa.model.generation.answer` (greedy, as the workbench does) and
prints p50 / p90 / max per answer type. The baseline, run in the same process on the same inputs, is one bare
forward pass of the model (what the first generated token costs): the ratio says how much generation and
scoring add on top of reading the image and the prompt, which is steadier across machines than seconds.

    .venv/bin/python bench/answer_latency_bench.py [--model DIR] [--limit 120] [--threads N]

With no --model it uses the model the workbench answers with (the default model under MEDVQA_HOME, built
on first use). Answering the test questions is not training on them: no result here feeds a model choice.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from medvqa.model.generation import answer, build_inputs
from medvqa.model.loading import load_vlm
from medvqa.model.prompts import load_prompt
from medvqa.training.data import load_vqa_jsonl
from medvqa.training.evaluate import load_image

TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad" / "test.jsonl"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="Checkpoint folder; default: the workbench's.")
    parser.add_argument("--data", type=Path, default=TEST, help="VQA jsonl whose questions are asked.")
    parser.add_argument("--limit", type=int, default=120, help="Questions per answer type (closed, open).")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from medvqa.config import load_settings
        from medvqa.services.evaluation import base_model_path

        args.model = base_model_path(load_settings())

    started = time.perf_counter()
    loaded = load_vlm(args.model, device="auto", dtype="auto")
    cold_load = time.perf_counter() - started
    examples = load_vqa_jsonl(args.data)
    chosen = {kind: [e for e in examples if e.answer_type == kind][: args.limit] for kind in ("CLOSED", "OPEN")}
    answer(loaded, load_image(examples[0]), examples[0].question)  # warm-up: first-call allocations

    template = load_prompt()
    rows = []
    for kind, items in chosen.items():
        answer_ms, forward_ms, tokens = [], [], []
        for example in items:
            image = load_image(example)
            result = answer(loaded, image, example.question)
            answer_ms.append(result.latency_ms)
            tokens.append(len(result.token_scores))
            start = time.perf_counter()
            with torch.inference_mode():
                loaded.model(**build_inputs(loaded, template, image, example.question))
            forward_ms.append((time.perf_counter() - start) * 1000.0)
        if answer_ms:
            rows.append((kind.lower(), len(items), answer_ms, forward_ms, statistics.mean(tokens)))

    print(f"model {loaded.model_ref} on {loaded.device} ({loaded.dtype}), torch threads {torch.get_num_threads()}")
    print(f"cold load: {cold_load:.2f} s (weights from disk to a ready model; first call excluded below)\n")
    print("| questions | n | answer p50 (s) | p90 (s) | max (s) | tokens | bare forward p50 (s) | answer / forward |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind, n, answer_ms, forward_ms, tokens in rows:
        p50, forward = percentile(answer_ms, 0.5) / 1000, percentile(forward_ms, 0.5) / 1000
        print(
            f"| {kind} | {n} | {p50:.3f} | {percentile(answer_ms, 0.9) / 1000:.3f} | {max(answer_ms) / 1000:.3f} "
            f"| {tokens:.1f} | {forward:.3f} | {p50 / forward:.1f}x |"
        )


if __name__ == "__main__":
    main()
