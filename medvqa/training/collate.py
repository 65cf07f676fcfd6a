"""Training batches for a VQA adapter: prompts rendered exactly as `generation.build_inputs` renders them.

Each target is `prompt + separator + answer.strip() + end marker`, where the prompt is the chat template's
generation prompt for the same messages (system-role handling included) that answering uses. The separator is
empty when the generation prompt ends in whitespace (ChatML's "<|im_start|>assistant\\n": see
`default_processor`) and one space otherwise (LLaVA's "ASSISTANT:" is answered with " no"). The end marker is
the special token the chat template closes an assistant turn with (`<|im_end|>`, `<end_of_turn>`...), else the
tokenizer's EOS. Labels are -100 on the prompt and on padding, so the loss covers only the answer and its end.
The prompt's tokens must be an exact prefix of the target's tokens; if a tokenizer merges across the boundary,
the batch is refused with a clear error rather than silently training on shifted labels.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvqa.errors import InvalidInput, ModelError
from medvqa.model.generation import accepts_system_role, plain_prompt, reserved_tokens
from medvqa.model.prompts import PromptTemplate, build_messages

if TYPE_CHECKING:
    from PIL.Image import Image

    from medvqa.training.data import VQAExample

IGNORE_INDEX = -100  # label value the loss skips
_SENTINEL = "MEDVQA-ANSWER-SENTINEL"


@functools.lru_cache(maxsize=1024)
def load_rgb(path: Path) -> Image:
    """The image at `path` as RGB, read fully so the file is closed at once.

    Cached: an epoch asks for each VQA-RAD image about nine times, and decoding dominated GPU steps. Callers
    must not modify the returned image (the processor makes its own resized copy).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise InvalidInput(f"cannot read image {path}: {exc}") from None


def answer_end_marker(processor: Any, template: PromptTemplate, system_role: bool) -> str:
    """The token that closes an assistant turn in this chat template, else the tokenizer's EOS token."""
    from jinja2 import TemplateError

    tokenizer = processor.tokenizer
    tail = ""
    if getattr(processor, "chat_template", None):
        probe = build_messages(template, "?", system_role=system_role)
        probe.append({"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]})
        try:
            tail = str(processor.apply_chat_template(probe, tokenize=False)).partition(_SENTINEL)[2]
        except (TemplateError, ValueError, TypeError, KeyError, IndexError):
            tail = ""
    specials = {token for token in reserved_tokens(processor) if token in tail}
    if specials:
        return min(specials, key=lambda token: (tail.index(token), -len(token)))
    if not isinstance(tokenizer.eos_token, str) or not tokenizer.eos_token:
        raise ModelError("The tokenizer has no end-of-sequence token, so a trained answer could never end.")
    return str(tokenizer.eos_token)


class AnswerCollator:
    """Turns a list of VQAExample into model inputs with answer-only labels (a Trainer data collator)."""

    def __init__(self, processor: Any, template: PromptTemplate) -> None:
        self.processor = processor
        self.template = template
        self.reserved = reserved_tokens(processor)
        self.chat = bool(getattr(processor, "chat_template", None))
        self.system_role = accepts_system_role(processor, template) if self.chat else False
        self.end_marker = answer_end_marker(processor, template, self.system_role)
        processor.tokenizer.padding_side = "right"  # labels are aligned from the left

    def render(self, example: VQAExample) -> tuple[str, str]:
        """(prompt, prompt + answer + end marker) as text, the prompt as answering renders it."""
        messages = build_messages(self.template, example.question, system_role=self.system_role, reserved=self.reserved)
        if self.chat:
            prompt = str(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        else:
            prompt = plain_prompt(self.processor, messages)
        separator = "" if prompt[-1:].isspace() else " "
        return prompt, prompt + separator + example.answer.strip() + self.end_marker

    def __call__(self, examples: list[VQAExample]) -> dict[str, Any]:
        images = [load_rgb(example.image_path) for example in examples]
        prompts, targets = zip(*(self.render(example) for example in examples), strict=True)
        batch = self._encode(list(targets), images, padding=True)
        labels = batch["input_ids"].clone()
        for row, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
            prompt_ids = self._encode([prompt], [image])["input_ids"][0]
            length = len(prompt_ids)
            if labels.shape[1] < length or not bool((batch["input_ids"][row, :length] == prompt_ids).all()):
                raise ModelError(
                    f"The tokens of question {examples[row].qid!r}'s prompt are not a prefix of its prompt + answer: "
                    "this tokenizer merges across the boundary, so the answer cannot be masked reliably."
                )
            labels[row, :length] = IGNORE_INDEX
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        batch["labels"] = labels
        return dict(batch)

    def _encode(self, texts: list[str], images: list[Image], *, padding: bool = False) -> Any:
        """Tokenize as the processor's apply_chat_template does: no second BOS when the text starts with one."""
        bos = self.processor.tokenizer.bos_token
        add_special = not (isinstance(bos, str) and bos and texts[0].startswith(bos))
        encoded = self.processor(
            text=texts, images=images, padding=padding, return_tensors="pt", add_special_tokens=add_special
        )
        encoded.pop("labels", None)  # PaliGemma's own labels; ours replace them
        return encoded
