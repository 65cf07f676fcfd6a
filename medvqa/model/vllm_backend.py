"""Answers from a vLLM server (OpenAI-compatible chat completions), with the same provenance as in process.

vLLM serves the base model under its `--served-model-name` and each LoRA adapter under the name given in
`--lora-modules NAME=PATH`; the request's `model` field picks one. medvqa names an adapter
`adapter-<first 12 hex of its SHA-256>` (`adapter_served_name`), so the name says which weights answer.
The prompt is the versioned template of prompts.py: instructions as the system turn, the image as a PNG
data URL, the question as its own text part. Only the standard library talks to the server.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medvqa.errors import AdapterMismatch, ModelError
from medvqa.model.generation import Answer, GenerationSettings, printable
from medvqa.model.loading import REF_HASH_CHARS
from medvqa.model.prompts import (
    DEFAULT_PROMPT_VERSION,
    PromptTemplate,
    build_messages,
    is_closed_question,
    load_prompt,
)

if TYPE_CHECKING:
    from PIL.Image import Image

    from medvqa.config import Settings

ADAPTER_NAME_PREFIX = "adapter-"
DEFAULT_SETTINGS = GenerationSettings()  # greedy, as in process
TOP_LOGPROBS = 20  # vLLM's default --max-logprobs; holds both closed answers at the first step in practice
MIN_LOGPROB = -9999.0  # what vLLM sends for -inf; JSON and the database cannot hold -inf
MAX_RESPONSE_BYTES = 16 << 20
# The server's tokenizer is not at hand, so a question holding any family's control strings is refused.
RESERVED = (
    "<image>",
    "<|image|>",
    "<|image_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<fake_token_around_image>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|begin_of_text|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<s>",
    "</s>",
)


@dataclass(frozen=True)
class TokenStep:
    """One generated token as the server reports it: its text, log-probability and the top alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class VLLMClient:
    """Answers through one vLLM server, as one served model (the base or an adapter on it)."""

    url: str  # server root, e.g. "http://gpu-1:8000" (no /v1)
    served_model: str  # the request's `model`: the base's served name or `adapter_served_name(sha256)`
    model_ref: str  # the base weights as medvqa names them, "<folder>@<sha12>", or "vllm:<served base name>"
    adapter_ref: str | None = None  # SHA-256 of the live adapter's weights, None for the bare base
    timeout_s: float = 60.0
    system_role: bool = True  # False: instructions go first in the user turn (templates without a system turn)

    def answer(
        self,
        image: Image,
        question: str,
        settings: GenerationSettings = DEFAULT_SETTINGS,
        prompt_version: str = DEFAULT_PROMPT_VERSION,
    ) -> Answer:
        """Ask `question` about `image`; the same Answer as `generation.answer` gives in process."""
        template = load_prompt(prompt_version)
        start = time.perf_counter()
        body = build_request(self.served_model, template, image, question, settings, self.system_role)
        text, steps = parse_completion(request_json(f"{self.url}/v1/chat/completions", body, self.timeout_s))
        latency_ms = (time.perf_counter() - start) * 1000.0
        token_scores = [step.logprob for step in steps]
        return Answer(
            text=printable(text),
            token_scores=token_scores,
            confidence=confidence(template, question, steps),
            model_ref=self.model_ref,
            adapter_ref=self.adapter_ref,
            prompt_version=template.version,
            decoding=settings.as_dict(),
            latency_ms=latency_ms,
        )


def adapter_served_name(sha256: str) -> str:
    """The name an adapter is served under (`--lora-modules adapter-<sha12>=PATH`)."""
    return ADAPTER_NAME_PREFIX + sha256[:REF_HASH_CHARS]


def connect_vllm(
    settings: Settings, adapter_sha256: str | None = None, adapter_base_ref: str | None = None
) -> VLLMClient:
    """A client for MEDVQA_VLLM_URL answering with the live adapter (if any), once the server says it serves it."""
    url = settings.vllm_url.rstrip("/").removesuffix("/v1")
    served = adapter_served_name(adapter_sha256) if adapter_sha256 else settings.vllm_model
    model_ref = settings.vllm_model_ref or f"vllm:{settings.vllm_model}"
    if settings.vllm_model_ref and adapter_base_ref and adapter_base_ref != settings.vllm_model_ref:
        raise AdapterMismatch(
            f"The live adapter was trained on {adapter_base_ref}, but MEDVQA_VLLM_MODEL_REF says the server runs "
            f"{settings.vllm_model_ref}; serve the adapter's base model or roll the adapter back."
        )
    names = served_models(url, settings.vllm_timeout_s)
    if served not in names:
        hint = (
            f"start vLLM with --enable-lora --lora-modules {served}=ADAPTER_FOLDER"
            if adapter_sha256
            else ("set MEDVQA_VLLM_MODEL to the server's --served-model-name")
        )
        raise ModelError(f"The vLLM server at {url} does not serve {served!r} (it serves {sorted(names)}); {hint}.")
    return VLLMClient(url, served, model_ref, adapter_sha256, settings.vllm_timeout_s, settings.vllm_system_role)


def served_models(url: str, timeout_s: float) -> set[str]:
    """The model names the server answers to (GET /v1/models): the base and each LoRA adapter."""
    payload = request_json(f"{url}/v1/models", None, timeout_s)
    try:
        return {str(entry["id"]) for entry in payload["data"]}
    except (KeyError, TypeError):
        raise ModelError(f"The vLLM server at {url} sent a malformed model list.") from None


def build_request(
    served_model: str,
    template: PromptTemplate,
    image: Image,
    question: str,
    settings: GenerationSettings,
    system_role: bool = True,
) -> dict[str, Any]:
    """The chat-completions body: prompts.py's messages with the image as a data URL, decoding as settings say."""
    messages = build_messages(template, question, system_role=system_role, reserved=RESERVED)
    image_part = {"type": "image_url", "image_url": {"url": image_data_url(image)}}
    for message in messages:
        message["content"] = [image_part if item["type"] == "image" else item for item in message["content"]]
    return {
        "model": served_model,
        "messages": messages,
        "max_tokens": settings.max_new_tokens,
        "temperature": settings.temperature if settings.do_sample else 0.0,
        "top_p": 1.0,
        "repetition_penalty": 1.0,  # vLLM extra: override a generation_config default, as generation.py does
        "n": 1,
        "stream": False,
        "logprobs": True,
        "top_logprobs": TOP_LOGPROBS if is_closed_question(question) else 0,
    }


def image_data_url(image: Image) -> str:
    """The image as a lossless PNG data URL: the server sees the exact pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def request_json(url: str, body: dict[str, Any] | None, timeout_s: float) -> Any:
    """GET (no body) or POST JSON to `url` and read a JSON reply; any failure is one ModelError line."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            payload = response.read(MAX_RESPONSE_BYTES)
    except urllib.error.HTTPError as exc:
        raise ModelError(f"The vLLM server at {url} answered HTTP {exc.code}{_error_detail(exc)}.") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ModelError(
            f"Cannot reach the vLLM server at {url}: {_one_line(reason)}; is it running (MEDVQA_VLLM_URL)?"
        ) from None
    try:
        return json.loads(payload)
    except ValueError:
        raise ModelError(f"The vLLM server at {url} sent a reply that is not JSON.") from None


def parse_completion(payload: Any) -> tuple[str, list[TokenStep]]:
    """The answer text and its tokens from a chat-completions reply; a malformed reply is a ModelError."""
    try:
        choice = payload["choices"][0]
        text = choice["message"]["content"]
        entries = choice["logprobs"]["content"]
        steps = [
            TokenStep(
                str(entry["token"]),
                _logprob(entry["logprob"]),
                tuple((str(top["token"]), _logprob(top["logprob"])) for top in entry.get("top_logprobs") or ()),
            )
            for entry in entries
        ]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise ModelError(
            "The vLLM server's reply lacks the answer or its logprobs; check the server version."
        ) from None
    if not isinstance(text, str):
        raise ModelError("The vLLM server's reply carries no answer text.")
    return text, steps


def confidence(template: PromptTemplate, question: str, steps: list[TokenStep]) -> float | None:
    """As generation.py: closed question, the chosen answer's share of the closed answers at the first word
    (from top_logprobs); otherwise, or when that cannot be told, the geometric mean token probability."""
    if not steps:
        return None
    if is_closed_question(question) and template.closed_answers:
        closed = closed_confidence(template.closed_answers, steps)
        if closed is not None:
            return closed
    return math.exp(sum(step.logprob for step in steps) / len(steps))


def closed_confidence(answers: tuple[str, ...], steps: list[TokenStep]) -> float | None:
    """Probability share of the chosen closed answer at the first generated token that is not blank."""
    step = next((step for step in steps if step.token.strip()), None)
    spellings = [_spellings(answer) for answer in answers]
    if step is None:
        return None
    chosen = next((i for i, words in enumerate(spellings) if step.token in words), None)
    if chosen is None:  # the model did not start with any closed answer
        return None
    candidates = dict(step.top)
    candidates.setdefault(step.token, step.logprob)
    mass = [sum(math.exp(lp) for token, lp in candidates.items() if token in words) for words in spellings]
    total = sum(mass)
    return mass[chosen] / total if total > 0 else None


def _spellings(word: str) -> set[str]:
    """A closed answer as one token may read: lower, Capitalised, UPPER; with or without a leading space."""
    variants = {word.lower(), word.capitalize(), word.upper()}
    return variants | {" " + variant for variant in variants}


def _logprob(value: Any) -> float:
    number = float(value)
    if math.isnan(number):
        raise ValueError("NaN logprob")
    return max(number, MIN_LOGPROB)


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """': <message>' from an OpenAI-style error body ({"message"} or {"error": {"message"}}), if any."""
    try:
        body = json.loads(exc.read(64 << 10))
        error = body.get("error") if isinstance(body.get("error"), dict) else body
        message = error.get("message")
    except (ValueError, AttributeError, OSError):
        return ""
    return f": {_one_line(message)}" if message else ""


def _one_line(value: object) -> str:
    lines = [line.strip() for line in str(value).splitlines() if line.strip()]
    text = lines[0] if lines else type(value).__name__
    return text if len(text) <= 200 else text[:197] + "..."
