"""Answer one question about one image with a loaded model, with per-token scores and a confidence.

Pipeline: clean the question and build chat messages (prompts.py) -> the processor renders them with the
checkpoint's chat template and turns text + image into tensors -> `generate` with raw logits kept -> decode
the new tokens only. Decoding is greedy by default, so the same input gives the same answer. Scores come from
the model's raw logits (before any logits processor), so they describe the model, not the decoding knobs.
"""

from __future__ import annotations

import math
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from medvqa.errors import InvalidInput
from medvqa.model.prompts import DEFAULT_PROMPT_VERSION, PromptTemplate, build_messages, is_closed_question, load_prompt

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

    from medvqa.model.loading import LoadedModel

MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode; recorded with every answer so it can be reproduced."""

    max_new_tokens: int = 24  # answer length bound, 1..MAX_NEW_TOKENS
    do_sample: bool = False  # greedy by default: same input -> same answer
    temperature: float = 1.0  # used only when sampling; > 0

    def __post_init__(self) -> None:
        if type(self.max_new_tokens) is not int or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidInput(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, not {self.max_new_tokens}.")
        if not (math.isfinite(self.temperature) and 0 < self.temperature <= 10):
            raise InvalidInput(f"temperature must be in (0, 10], not {self.temperature}.")

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-able values, for the answer's provenance."""
        return asdict(self)


@dataclass(frozen=True)
class Answer:
    """A model's answer and everything needed to trust, store and reproduce it."""

    text: str  # decoded new tokens, special tokens skipped, control characters blanked, stripped
    token_scores: list[float]  # log-probability of each generated token (end-of-sequence included)
    confidence: float | None  # closed question: yes/no probability mass; open: geometric mean token probability
    model_ref: str  # base weights, "<folder>@<sha12>"
    adapter_ref: str | None  # SHA-256 of the adapter weights, None for the bare base
    prompt_version: str
    decoding: dict[str, Any]  # GenerationSettings.as_dict()
    latency_ms: float  # preprocessing + generation, wall clock
    token_ids: tuple[int, ...] = ()  # the generated token ids (end-of-sequence included): what a heatmap explains


class TextStream:
    """A `generate` streamer that hands the answer so far (decoded, printable) to `on_text` at every new token,
    so a page can show the first words while the rest is generated. The first `put` is the prompt: skipped."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.tokens: list[int] = []
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.tokens.extend(int(token) for token in value.reshape(-1).tolist())
        self.on_text(printable(self.tokenizer.decode(self.tokens, skip_special_tokens=True)))

    def end(self) -> None:
        """Nothing to flush: every token was handed on as it came."""


def answer(
    loaded: LoadedModel,
    image: Image,
    question: str,
    settings: GenerationSettings = GenerationSettings(),
    prompt_version: str = DEFAULT_PROMPT_VERSION,
    adapter_ref: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Answer:
    """Ask `question` about `image`; `adapter_ref` defaults to the adapter `load_adapter` put on the model.
    With `on_text`, the answer so far is handed to it as each token is generated (streaming)."""
    import torch

    template = load_prompt(prompt_version)
    start = time.perf_counter()
    inputs = build_inputs(loaded, template, image, question)
    streamer = TextStream(loaded.processor.tokenizer, on_text) if on_text is not None else None
    with torch.inference_mode():
        output = loaded.model.generate(
            **inputs,
            **_generate_kwargs(settings),
            output_logits=True,
            return_dict_in_generate=True,
            streamer=streamer,
        )
    latency_ms = (time.perf_counter() - start) * 1000.0
    new_tokens: list[int] = output.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    logprobs = [torch.log_softmax(step[0].float(), dim=-1) for step in output.logits]
    token_scores = [float(logprobs[i][token]) for i, token in enumerate(new_tokens)]
    tokenizer = loaded.processor.tokenizer
    text = printable(tokenizer.decode(new_tokens, skip_special_tokens=True))
    confidence = _confidence(tokenizer, template, question, new_tokens, logprobs, token_scores)
    return Answer(
        text=text,
        token_scores=token_scores,
        confidence=confidence,
        model_ref=loaded.model_ref,
        adapter_ref=adapter_ref if adapter_ref is not None else loaded.adapter_ref,
        prompt_version=template.version,
        decoding=settings.as_dict(),
        latency_ms=latency_ms,
        token_ids=tuple(new_tokens),
    )


def answer_batch(
    loaded: LoadedModel,
    images: Sequence[Image],
    questions: Sequence[str],
    settings: GenerationSettings = GenerationSettings(),
    prompt_version: str = DEFAULT_PROMPT_VERSION,
) -> list[Answer]:
    """`answer` for several (image, question) pairs in one left-padded `generate` call (the processor's own
    batching, KV cache): the same greedy tokens, scores and confidences as one at a time (tests compare them),
    at a fraction of the time. Each answer's latency is its share of the batch's wall time."""
    import torch

    if len(images) != len(questions):
        raise InvalidInput(f"{len(images)} images for {len(questions)} questions; give one image per question")
    if not questions:
        return []
    template = load_prompt(prompt_version)
    start = time.perf_counter()
    inputs = build_batch_inputs(loaded, template, images, questions)
    with torch.inference_mode():
        output = loaded.model.generate(
            **inputs, **_generate_kwargs(settings), output_logits=True, return_dict_in_generate=True
        )
    latency_ms = (time.perf_counter() - start) * 1000.0 / len(questions)
    stops = _stop_ids(loaded)
    prompt_length = inputs["input_ids"].shape[1]
    tokenizer = loaded.processor.tokenizer
    answers = []
    for row, question in enumerate(questions):
        generated: list[int] = output.sequences[row, prompt_length:].tolist()
        end = next((i + 1 for i, token in enumerate(generated) if token in stops), len(generated))
        new_tokens = generated[:end]  # what one-at-a-time decoding returns: up to and with the first stop token
        logprobs = [torch.log_softmax(output.logits[step][row].float(), dim=-1) for step in range(end)]
        token_scores = [float(logprobs[i][token]) for i, token in enumerate(new_tokens)]
        answers.append(
            Answer(
                text=printable(tokenizer.decode(new_tokens, skip_special_tokens=True)),
                token_scores=token_scores,
                confidence=_confidence(tokenizer, template, question, new_tokens, logprobs, token_scores),
                model_ref=loaded.model_ref,
                adapter_ref=loaded.adapter_ref,
                prompt_version=template.version,
                decoding=settings.as_dict(),
                latency_ms=latency_ms,
                token_ids=tuple(new_tokens),
            )
        )
    return answers


def _stop_ids(loaded: LoadedModel) -> set[int]:
    """The token ids that end a generation (the generation config's end-of-sequence ids)."""
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        eos = loaded.processor.tokenizer.eos_token_id
    return {int(token) for token in (eos if isinstance(eos, list | tuple) else [eos]) if token is not None}


def build_batch_inputs(
    loaded: LoadedModel, template: PromptTemplate, images: Sequence[Image], questions: Sequence[str]
) -> Any:
    """Model inputs for a batch, padded on the left so that every prompt ends where generation starts."""
    processor = loaded.processor
    tokenizer = processor.tokenizer
    reserved = reserved_tokens(processor)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        if getattr(processor, "chat_template", None):
            system_role = accepts_system_role(processor, template)
            conversations = [
                build_messages(template, question, system_role=system_role, reserved=reserved) for question in questions
            ]
            inputs = processor.apply_chat_template(
                conversations,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={"images": [[image] for image in images], "padding": True},
            )
        else:  # e.g. PaliGemma ships no chat template
            texts = [
                plain_prompt(processor, build_messages(template, question, system_role=False, reserved=reserved))
                for question in questions
            ]
            inputs = processor(text=texts, images=list(images), padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    inputs.pop("labels", None)
    return inputs.to(loaded.model.device, dtype=loaded.model.dtype)


def build_inputs(loaded: LoadedModel, template: PromptTemplate, image: Image, question: str) -> Any:
    """Model inputs (token ids, pixels...) on the model's device, from the processor of the checkpoint."""
    processor = loaded.processor
    reserved = reserved_tokens(processor)
    if getattr(processor, "chat_template", None):
        system_role = accepts_system_role(processor, template)
        messages = build_messages(template, question, system_role=system_role, reserved=reserved)
        inputs = processor.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"images": [image]},
        )
    else:  # e.g. PaliGemma ships no chat template
        messages = build_messages(template, question, system_role=False, reserved=reserved)
        inputs = processor(text=plain_prompt(processor, messages), images=[image], return_tensors="pt")
    inputs.pop("labels", None)  # PaliGemma adds training labels; generation must not get them
    return inputs.to(loaded.model.device, dtype=loaded.model.dtype)


def plain_prompt(processor: Any, messages: list[dict[str, Any]]) -> str:
    """The prompt for a processor without a chat template: its image token, then the user turn's text items
    (instructions, question) one per line. Training renders its prompts through this too."""
    texts = [item["text"] for item in messages[0]["content"] if item["type"] == "text"]
    return str(getattr(processor, "image_token", "")) + "\n".join(texts)


def accepts_system_role(processor: Any, template: PromptTemplate) -> bool:
    """Whether the chat template renders a system turn; some raise on one, others silently drop it."""
    from jinja2 import TemplateError

    probe = build_messages(template, "?", system_role=True)
    try:
        rendered = processor.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError):
        return False
    return template.system.strip() in str(rendered)


def reserved_tokens(processor: Any) -> list[str]:
    """Control strings a question may not hold: special tokens ("<|im_end|>") and the processor's image markers.

    Plain added tokens (Gemma's HTML tags, PaliGemma's <loc0000>) are not reserved: text may contain them.
    """
    tokenizer = processor.tokenizer
    special = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    markers = [getattr(processor, name, None) for name in ("image_token", "video_token", "fake_image_token")]
    candidates = [*special, *tokenizer.all_special_tokens, *markers]
    return sorted({token for token in candidates if isinstance(token, str) and token.strip()})


def printable(text: str) -> str:
    """Decoded text safe to show and store: control characters (ESC, NUL, bidi overrides) blanked, except newline."""
    kept = (char if char == "\n" or not unicodedata.category(char).startswith("C") else " " for char in text)
    return "".join(kept).strip()


def _generate_kwargs(settings: GenerationSettings) -> dict[str, Any]:
    """`generate` arguments: ours, plus neutral values for knobs a checkpoint's generation_config may set."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
    }
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_k=0, top_p=1.0)
    return kwargs


def _confidence(
    tokenizer: Any,
    template: PromptTemplate,
    question: str,
    tokens: list[int],
    logprobs: list[torch.Tensor],
    token_scores: list[float],
) -> float | None:
    """Closed question: p(chosen answer) / p(all closed answers) at the answer's first word; else geometric mean."""
    if not token_scores:
        return None
    if is_closed_question(question) and template.closed_answers:
        closed = _closed_confidence(tokenizer, template.closed_answers, tokens, logprobs)
        if closed is not None:
            return closed
    return math.exp(sum(token_scores) / len(token_scores))


def _closed_confidence(
    tokenizer: Any, answers: tuple[str, ...], tokens: list[int], logprobs: list[torch.Tensor]
) -> float | None:
    """Probability share of the chosen closed answer at the first generated step that is not blank."""
    ids_per_answer = [answer_token_ids(tokenizer, answer) for answer in answers]
    step = next((i for i, token in enumerate(tokens) if tokenizer.decode([token]).strip()), None)
    if step is None or not all(ids_per_answer):
        return None
    chosen = next((ids for ids in ids_per_answer if tokens[step] in ids), None)
    if chosen is None:  # the model did not start with any closed answer
        return None
    probs = logprobs[step].exp()
    total = sum(float(probs[list(ids)].sum()) for ids in ids_per_answer)
    return float(probs[list(chosen)].sum()) / total if total > 0 else None


def answer_token_ids(tokenizer: Any, word: str) -> set[int]:
    """Single-token ids that spell `word` (lower, Capitalised, UPPER; with or without a leading space)."""
    ids: set[int] = set()
    for variant in {word.lower(), word.capitalize(), word.upper()}:
        for spelling in (variant, " " + variant):
            encoded = tokenizer.encode(spelling, add_special_tokens=False)
            if len(encoded) == 1 and tokenizer.decode(encoded).strip() == variant:
                ids.add(int(encoded[0]))
    return ids
