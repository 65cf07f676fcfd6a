"""load_vlm on tiny checkpoints of every family; content-addressed model refs; clear refusals."""

# ruff: noqa: F811 - fixtures imported from tests/model_factory.py are test parameters by design

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from medvqa.errors import InvalidInput, MedVQAError, ModelError, NotFound
from medvqa.model.loading import load_vlm, resolve_device, weights_sha256
from tests.model_factory import build_tiny_vlm, tiny_checkpoints, torch_single_thread  # noqa: F401 - pytest fixtures

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
NEEDS_TORCHVISION = pytest.mark.skipif(not HAS_TORCHVISION, reason="Qwen2-VL's processor needs torchvision")
LOADABLE = ["llava", "idefics3", "paligemma", "gemma3", pytest.param("qwen2_vl", marks=NEEDS_TORCHVISION)]


def _assert_one_line(error: MedVQAError) -> None:
    message = str(error)
    assert "\n" not in message and "Traceback" not in message and len(message) < 400


@pytest.mark.parametrize("family", LOADABLE)
def test_load_vlm_gives_eval_model_processor_and_content_ref(
    family: str, tiny_checkpoints: Callable[[str], Path]
) -> None:
    folder = tiny_checkpoints(family)
    loaded = load_vlm(folder, device="cpu")
    assert not loaded.model.training
    assert loaded.model.config.model_type == family
    assert loaded.processor.tokenizer is not None and loaded.processor.image_processor is not None
    assert loaded.model_ref == f"{folder.name}@{weights_sha256(folder)[:12]}"
    assert re.fullmatch(r"[^@]+@[0-9a-f]{12}", loaded.model_ref)
    assert (loaded.device, loaded.dtype, loaded.adapter_ref) == ("cpu", "float32", None)
    assert next(loaded.model.parameters()).dtype == torch.float32


def test_explicit_dtype_is_honoured(tiny_checkpoints: Callable[[str], Path]) -> None:
    loaded = load_vlm(tiny_checkpoints("llava"), device="cpu", dtype="bfloat16")
    assert loaded.dtype == "bfloat16"
    assert {parameter.dtype for parameter in loaded.model.parameters()} == {torch.bfloat16}


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed here, so Qwen2-VL loads")
def test_qwen2_vl_without_torchvision_names_the_missing_package(tiny_checkpoints: Callable[[str], Path]) -> None:
    with pytest.raises(ModelError, match="torchvision") as caught:
        load_vlm(tiny_checkpoints("qwen2_vl"), device="cpu")
    _assert_one_line(caught.value)


def test_missing_folder_is_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(NotFound, match="no-such-model") as caught:
        load_vlm(missing)
    _assert_one_line(caught.value)


def test_folder_without_config_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelError, match=r"config\.json") as caught:
        load_vlm(tmp_path)
    _assert_one_line(caught.value)


def test_text_only_architecture_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ModelError, match=r"'bert'.*not an image-text-to-text") as caught:
        load_vlm(tmp_path)
    _assert_one_line(caught.value)


def test_pickled_weights_only_are_refused(tmp_path: Path, tiny_checkpoints: Callable[[str], Path]) -> None:
    shutil.copy(tiny_checkpoints("llava") / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelError, match="safetensors"):
        load_vlm(tmp_path)


def test_corrupt_weights_are_a_model_error(tmp_path: Path, tiny_checkpoints: Callable[[str], Path]) -> None:
    folder = shutil.copytree(tiny_checkpoints("llava"), tmp_path / "broken")
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ModelError, match="Cannot load the model weights") as caught:
        load_vlm(folder)
    _assert_one_line(caught.value)


def test_weights_sha256_streams_files_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "b.safetensors").write_bytes(b"second")
    (tmp_path / "a.safetensors").write_bytes(b"first")
    (tmp_path / "config.json").write_text("{}")  # not a weight file: ignored
    assert weights_sha256(tmp_path) == hashlib.sha256(b"firstsecond").hexdigest()
    (tmp_path / "b.safetensors").write_bytes(b"secone")
    assert weights_sha256(tmp_path) != hashlib.sha256(b"firstsecond").hexdigest()


def test_model_ref_changes_when_weights_change(tmp_path: Path, tiny_checkpoints: Callable[[str], Path]) -> None:
    original = tiny_checkpoints("llava")
    retrained = build_tiny_vlm("llava", tmp_path / original.name, seed=1)
    assert weights_sha256(retrained) != weights_sha256(original)
    assert load_vlm(retrained).model_ref != load_vlm(original).model_ref


def test_resolve_device_auto_prefers_cuda_with_bfloat16_else_cpu() -> None:
    device, dtype = resolve_device("auto")
    if torch.cuda.is_available():
        assert device == "cuda:0" and dtype in (torch.bfloat16, torch.float16)
    else:
        assert (device, dtype) == ("cpu", torch.float32)
    assert resolve_device("CPU") == ("cpu", torch.float32)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "", "gpu0"])
def test_resolve_device_refuses_unknown_names(device: str) -> None:
    with pytest.raises(InvalidInput, match="Unknown device"):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_resolve_device_refuses_cuda_without_a_gpu() -> None:
    with pytest.raises(InvalidInput, match="no such CUDA GPU"):
        resolve_device("cuda")


def test_unknown_dtype_is_refused(tiny_checkpoints: Callable[[str], Path]) -> None:
    with pytest.raises(InvalidInput, match="float64"):
        load_vlm(tiny_checkpoints("llava"), dtype="float64")
