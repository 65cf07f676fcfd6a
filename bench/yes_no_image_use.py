"""Does a model read the image on yes/no questions? Its yes/no choice with the question's own image, a black
image, another image, and visual contrastive decoding against the black image.

For every yes/no question (prompts.is_closed_question) whose reference is yes or no, one forward pass per
condition gives the first answer token's log-probability mass on "yes" and on "no" (every spelling
`answer_token_ids` accepts); the likelier one is the choice. Conditions:

- own image: what greedy answering picks when it starts with yes or no;
- black image: the blind baseline of `medvqa eval`;
- other image: the shuffled baseline (`evaluate.other_images`): a model that reads the image it was asked
  about must do worse here than with its own image;
- contrast a: visual contrastive decoding (Leng et al., CVPR 2024) restricted to the two answers,
  (1 + a) * own - a * black: it subtracts the language prior the black image exposes, and so helps only when
  the own-image scores carry the image's content;
- contrast a on the other image: the same, so that what is left of the language prior can be told apart.

Prints a table: condition, questions, accuracy, share answered "yes", and the ratio to the black-image run.

    .venv/bin/python bench/yes_no_image_use.py --model DIR [--data FILE.jsonl] [--limit N] [--threads N]

Measured on VQA-RAD test for the README. No figure here feeds a training choice; the test figures did
decide against shipping contrastive decoding, as the README says.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from medvqa.model.generation import answer_token_ids, build_inputs
from medvqa.model.loading import LoadedModel, load_vlm
from medvqa.model.prompts import is_closed_question, load_prompt
from medvqa.training.data import VQAExample, load_vqa_jsonl
from medvqa.training.evaluate import load_image, other_images
from medvqa.training.metrics import normalize_answer

TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad" / "test.jsonl"
CONTRASTS = (0.5, 1.0)


def yes_no_masses(loaded: LoadedModel, example: VQAExample, *, blind: bool = False) -> tuple[float, float]:
    """Log-probability mass of "yes" and of "no" at the first answer token, for the example's image."""
    tokenizer = loaded.processor.tokenizer
    inputs = build_inputs(loaded, load_prompt(), load_image(example, blind=blind), example.question)
    with torch.inference_mode():
        logprobs = torch.log_softmax(loaded.model(**inputs).logits[0, -1].float(), dim=-1)
    yes, no = (sorted(answer_token_ids(tokenizer, word)) for word in ("yes", "no"))
    return float(torch.logsumexp(logprobs[yes], 0)), float(torch.logsumexp(logprobs[no], 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="Checkpoint folder (e.g. the folded default).")
    parser.add_argument("--data", type=Path, default=TEST, help="VQA jsonl; default: VQA-RAD test.jsonl.")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N yes/no questions.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    examples = load_vqa_jsonl(args.data)
    swap = other_images(examples)
    asked = [e for e in examples if is_closed_question(e.question) and normalize_answer(e.answer) in ("yes", "no")]
    asked = asked[: args.limit]
    loaded = load_vlm(args.model, device="cpu")
    rows: dict[str, list[bool]] = {}
    said_yes: dict[str, list[bool]] = {}

    def record(condition: str, masses: tuple[float, float], reference: str) -> None:
        choice = "yes" if masses[0] >= masses[1] else "no"
        rows.setdefault(condition, []).append(choice == reference)
        said_yes.setdefault(condition, []).append(choice == "yes")

    for example in asked:
        reference = normalize_answer(example.answer)
        own = yes_no_masses(loaded, example)
        black = yes_no_masses(loaded, example, blind=True)
        other = yes_no_masses(loaded, replace(example, image_path=swap[example.image_path]))
        record("own image", own, reference)
        record("black image (blind)", black, reference)
        record("other image (shuffled)", other, reference)
        for strength in CONTRASTS:
            for name, seen in (("own", own), ("other", other)):
                contrasted = (
                    (1 + strength) * seen[0] - strength * black[0],
                    (1 + strength) * seen[1] - strength * black[1],
                )
                record(f"contrast {strength:g}, {name} image", contrasted, reference)

    baseline = sum(rows["black image (blind)"]) / len(asked)
    print(
        f"yes/no questions: {len(asked)} from {args.data.name}; reference 'yes' share: "
        f"{sum(normalize_answer(e.answer) == 'yes' for e in asked) / len(asked):.1%}"
    )
    print("| condition | n | accuracy | says yes | vs blind |\n|---|---:|---:|---:|---:|")
    for condition, right in rows.items():
        accuracy = sum(right) / len(right)
        yes_share = sum(said_yes[condition]) / len(right)
        ratio = f"{accuracy / baseline:.3f}" if baseline else "n/a"
        print(f"| {condition} | {len(right)} | {accuracy:.1%} | {yes_share:.1%} | {ratio} |")


if __name__ == "__main__":
    main()
