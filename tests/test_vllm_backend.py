"""The vLLM backend (medvqa/model/vllm_backend.py) against a stand-in server.

The server here is NOT vLLM: it is `http.server` in a thread on 127.0.0.1 that speaks the protocol subset medvqa
uses (POST /v1/chat/completions answering choices[0].message.content and choices[0].logprobs.content with
token / logprob / top_logprobs; GET /v1/models). It checks the request medvqa sends and how the reply is read,
without a GPU; that a real vLLM accepts the request is untested here (see docs/gpu.md).
"""

from __future__ import annotations

import base64
import io
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from medvqa.config import load_settings
from medvqa.db import Adapter, AdapterStatus, Answer
from medvqa.errors import AdapterMismatch, ConfigError, InvalidInput, ModelError
from medvqa.model.generation import GenerationSettings
from medvqa.model.prompts import load_prompt
from medvqa.model.vllm_backend import VLLMClient, adapter_served_name, connect_vllm
from medvqa.services.ask import ImageChoice, ask, load_answering_model
from tests.workbench.conftest import import_ct

SHA = "ab12" * 16
P_YES, P_NO, P_OTHER, EOS_LOGPROB = 0.8, 0.15, 0.05, -0.01


def closed_reply() -> dict[str, Any]:
    """A yes/no answer: "Yes" then the end marker, with the alternatives at the first step."""
    first = {
        "token": "Yes",
        "logprob": math.log(P_YES),
        "top_logprobs": [
            {"token": "Yes", "logprob": math.log(P_YES)},
            {"token": " no", "logprob": math.log(P_NO)},
            {"token": "The", "logprob": math.log(P_OTHER)},
        ],
    }
    end = {"token": "<|im_end|>", "logprob": EOS_LOGPROB, "top_logprobs": []}
    return {"choices": [{"message": {"role": "assistant", "content": "Yes"}, "logprobs": {"content": [first, end]}}]}


class FakeVLLM:
    """What the stand-in server serves and what it was sent."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.models = ["medvqa-base", adapter_served_name(SHA)]
        self.status = 200
        self.raw: bytes | None = None  # sent as is instead of `reply`
        self.reply: dict[str, Any] = closed_reply()
        self.delay_s = 0.0
        self.url = ""


def _handler(fake: FakeVLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep the test output quiet
            pass

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path != "/v1/models":
                return self._send(404, b'{"message": "no such route"}')
            data = [{"id": name, "object": "model"} for name in fake.models]
            self._send(200, json.dumps({"object": "list", "data": data}).encode())

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            fake.requests.append(body)
            time.sleep(fake.delay_s)
            if fake.status != 200:
                error = {"object": "error", "message": "boom\nsecond line", "code": fake.status}
                return self._send(fake.status, json.dumps(error).encode())
            self._send(200, fake.raw if fake.raw is not None else json.dumps(fake.reply).encode())

    return Handler


@pytest.fixture
def fake_vllm() -> Iterator[FakeVLLM]:
    fake = FakeVLLM()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads, server.block_on_close = True, False
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def image() -> Image.Image:
    pixels = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    return Image.fromarray(pixels, "RGB")


def client(fake: FakeVLLM, served: str = "medvqa-base", adapter_ref: str | None = None) -> VLLMClient:
    return VLLMClient(fake.url, served, "base@0123456789ab", adapter_ref, timeout_s=5.0)


def test_the_request_carries_the_image_the_question_apart_and_greedy_decoding(fake_vllm, image):
    question = "Is there a fracture?"
    client(fake_vllm).answer(image, question)
    body = fake_vllm.requests[-1]
    system, user = body["messages"]
    assert system == {"role": "system", "content": [{"type": "text", "text": load_prompt().system}]}
    image_part, question_part = user["content"]
    assert question_part == {"type": "text", "text": question}
    url = image_part["image_url"]["url"]
    assert image_part["type"] == "image_url" and url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert np.array_equal(np.asarray(sent), np.asarray(image))  # lossless: the server sees the same pixels
    assert body["model"] == "medvqa-base" and body["temperature"] == 0 and body["max_tokens"] == 24
    assert body["logprobs"] is True and body["top_logprobs"] == 20


def test_the_answer_has_the_in_process_provenance(fake_vllm, image):
    result = client(fake_vllm, adapter_served_name(SHA), SHA).answer(image, "Is there a fracture?")
    assert result.text == "Yes"
    assert result.token_scores == pytest.approx([math.log(P_YES), EOS_LOGPROB])
    assert result.confidence == pytest.approx(P_YES / (P_YES + P_NO))  # "The" is no closed answer
    assert (result.model_ref, result.adapter_ref, result.prompt_version) == ("base@0123456789ab", SHA, "vqa-v1")
    assert result.decoding == GenerationSettings().as_dict() and result.latency_ms > 0
    assert fake_vllm.requests[-1]["model"] == "adapter-ab12ab12ab12"


def test_open_questions_get_the_geometric_mean_and_no_alternatives(fake_vllm, image):
    fake_vllm.reply["choices"][0]["message"]["content"] = "\x1b[31mchest "  # control characters are blanked
    result = client(fake_vllm).answer(image, "What organ is shown?", GenerationSettings(max_new_tokens=5))
    assert result.text == "[31mchest"
    assert result.confidence == pytest.approx(math.exp((math.log(P_YES) + EOS_LOGPROB) / 2))
    assert fake_vllm.requests[-1]["top_logprobs"] == 0 and fake_vllm.requests[-1]["max_tokens"] == 5


def test_a_question_holding_model_markup_is_refused_before_sending(fake_vllm, image):
    with pytest.raises(InvalidInput, match="reserves"):
        client(fake_vllm).answer(image, "Is there <image> a fracture?")
    assert fake_vllm.requests == []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ({"status": 500}, "answered HTTP 500: boom"),
        ({"raw": b"<html>not json"}, "not JSON"),
        ({"raw": b'{"choices": [{"message": {"content": "yes"}}]}'}, "lacks the answer or its logprobs"),
        ({"raw": b'{"choices": []}'}, "lacks the answer"),
        ({"delay_s": 1.0}, "Cannot reach the vLLM server"),
    ],
)
def test_server_failures_are_one_line_model_errors(fake_vllm, image, setup, message):
    for key, value in setup.items():
        setattr(fake_vllm, key, value)
    remote = VLLMClient(fake_vllm.url, "medvqa-base", "base@0", timeout_s=0.3)
    with pytest.raises(ModelError, match=message) as raised:
        remote.answer(image, "Is there a fracture?")
    assert "\n" not in str(raised.value)


def test_a_server_that_is_down_is_a_one_line_model_error(image):
    remote = VLLMClient(f"http://127.0.0.1:{_closed_port()}", "medvqa-base", "base@0", timeout_s=2.0)
    with pytest.raises(ModelError, match=r"Cannot reach the vLLM server .*MEDVQA_VLLM_URL") as raised:
        remote.answer(image, "Is there a fracture?")
    assert "\n" not in str(raised.value)


def test_connect_picks_the_adapter_by_name_and_checks_the_server_serves_it(fake_vllm):
    settings = load_settings(model_backend="vllm", vllm_url=fake_vllm.url + "/v1/", vllm_model_ref="base@0")
    bare = connect_vllm(settings)
    assert (bare.url, bare.served_model, bare.adapter_ref, bare.model_ref) == (
        fake_vllm.url,
        "medvqa-base",
        None,
        "base@0",
    )
    assert connect_vllm(settings, SHA, "base@0").served_model == "adapter-ab12ab12ab12"
    with pytest.raises(
        ModelError, match=r"does not serve 'adapter-cdcdcdcdcdcd'.*--lora-modules adapter-cdcdcdcdcdcd="
    ):
        connect_vllm(settings, "cd" * 32, "base@0")
    with pytest.raises(AdapterMismatch, match="trained on other@1"):
        connect_vllm(settings, SHA, "other@1")
    assert connect_vllm(load_settings(vllm_url=fake_vllm.url)).model_ref == "vllm:medvqa-base"


@pytest.mark.parametrize(
    ("field", "value"), [("model_backend", "onnx"), ("vllm_url", "gpu-1:8000"), ("vllm_timeout_s", "0")]
)
def test_bad_backend_settings_are_one_config_error(monkeypatch, field, value):
    monkeypatch.setenv(f"MEDVQA_{field.upper()}", value)
    with pytest.raises(ConfigError, match=f"MEDVQA_{field.upper()}"):
        load_settings()


def test_asking_through_the_service_stores_the_vllm_answer_with_its_provenance(
    db, cli_env, fake_vllm, clinician, tmp_path, monkeypatch
):
    monkeypatch.setenv("MEDVQA_MODEL_BACKEND", "vllm")
    monkeypatch.setenv("MEDVQA_VLLM_URL", fake_vllm.url)
    settings = load_settings()
    study_id, _ = import_ct(db, settings, tmp_path / "ct", count=1)
    with db.session() as session, session.begin():
        live = Adapter(name="round1", sha256=SHA, path="/adapters/round1", base_model_ref="base@0", metrics={})
        live.status = AdapterStatus.LIVE
        session.add(live)
        session.flush()
        adapter_id = live.id
    model = load_answering_model(db, settings)
    assert model.backend == "vllm" and model.adapter_id == adapter_id
    result = ask(db, clinician, settings, model, study_id, "Is there a fracture?", ImageChoice(slices=0))
    with db.read_session() as session:
        row = session.get(Answer, result.answer_id)
        stored = session.scalars(select(Answer)).all()
    assert stored == [row] and fake_vllm.requests[-1]["model"] == "adapter-ab12ab12ab12"
    assert (row.backend, row.text, row.adapter_id, row.adapter_ref) == ("vllm", "Yes", adapter_id, SHA)
    assert (row.model_ref, row.prompt_version) == ("vllm:medvqa-base", "vqa-v1")
    assert row.confidence == pytest.approx(P_YES / (P_YES + P_NO)) and row.latency_ms > 0
    assert row.token_scores == pytest.approx([math.log(P_YES), EOS_LOGPROB])
    assert row.decoding == GenerationSettings().as_dict() and row.preprocess_hash == result.preprocess_hash
