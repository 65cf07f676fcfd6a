"""Training throughput of the default model on real VQA-RAD training batches, per image size and mode.

Times forward + backward + AdamW step (median of --steps after one warm-up; preprocessing not timed) and one
greedy 8-token answer, and prints seconds per sample and minutes per epoch over the 2,780 training questions.

    .venv/bin/python bench/train_throughput_bench.py [--work DIR] [--steps 6] 128:lora 192:lora 128:frozen_lm ...

Modes: full (everything trained), lora (LoRA r16 on the language model's linears; vision tower and projector
trained in full), frozen_lm (vision tower and projector only). Each size builds its own untrained default model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from medvqa.model.adapters import LANGUAGE_MODEL_LINEAR
from medvqa.model.default_model import DefaultModelConfig, build_default_model
from medvqa.model.default_processor import ANSWER_END
from medvqa.model.smollm2 import convert_smollm2

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad"
SYSTEM = "You are a radiology assistant. Answer the question about the image briefly."
BATCH, TRAIN_QUESTIONS = 8, 2780


def messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]},
    ]


def batch(processor: Any, rows: list[dict[str, Any]]) -> tuple[Any, torch.Tensor]:
    """Prompt + answer + end marker; loss only on the answer (prompt and padding masked)."""
    prompts, images, prompt_lengths = [], [], []
    for row in rows:
        prompt = processor.apply_chat_template(messages(row), add_generation_prompt=True)
        image = Image.open(DATA / row["image"]).convert("RGB")
        prompt_lengths.append(len(processor(images=image, text=prompt)["input_ids"][0]))
        prompts.append(prompt + row["answer"].strip() + ANSWER_END)
        images.append(image)
    encoded = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    labels = encoded["input_ids"].clone()
    for index, length in enumerate(prompt_lengths):
        labels[index, :length] = -100
    labels[encoded["attention_mask"] == 0] = -100
    return encoded, labels


def prepare(model: Any, mode: str) -> Any:
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=LANGUAGE_MODEL_LINEAR,
            modules_to_save=["vision_tower", "multi_modal_projector"],
        )
        return get_peft_model(model, config)
    if mode == "frozen_lm":
        for parameter in model.model.language_model.parameters():
            parameter.requires_grad_(False)
        model.lm_head.weight.requires_grad_(False)
    return model


def train_step_seconds(folder: Path, mode: str, rows: list[dict[str, Any]], steps: int) -> float:
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = prepare(AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True), mode).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for step in range(steps + 1):
        encoded, labels = batch(processor, rows[BATCH * step : BATCH * (step + 1)])
        start = time.perf_counter()
        model(**encoded, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def answer_seconds(folder: Path, row: dict[str, Any]) -> float:
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    text = processor.apply_chat_template(messages(row), add_generation_prompt=True)
    encoded = processor(images=Image.open(DATA / row["image"]).convert("RGB"), text=text, return_tensors="pt")
    times = []
    for _ in range(4):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**encoded, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="SIZE:MODE, e.g. 128:lora")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "medvqa-bench")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = [json.loads(line) for line in (DATA / "train.jsonl").open()][: BATCH * (args.steps + 1)]
    text_model = convert_smollm2(args.work / "smollm2")
    results = []
    for spec in args.specs:
        size, mode = spec.split(":")
        config = DefaultModelConfig(image_size=int(size))
        folder = build_default_model(text_model, args.work / f"default-{size}", config)
        step = train_step_seconds(folder, mode, rows, args.steps)
        results.append((int(size), config.image_token_count, mode, step / BATCH, answer_seconds(folder, rows[0])))
    print(f"\n{torch.get_num_threads()} torch threads, batch {BATCH}, load average {os.getloadavg()[0]:.1f}\n")
    print("| image px | image tokens | mode | s/sample | min/epoch (2,780 QA) | 8-token answer s |")
    print("|---:|---:|---|---:|---:|---:|")
    for size, tokens, mode, per_sample, answer in results:
        epoch = per_sample * TRAIN_QUESTIONS / 60
        print(f"| {size} | {tokens} | {mode} | {per_sample:.2f} | {epoch:.0f} | {answer:.2f} |")


if __name__ == "__main__":
    main()
