"""LoRA adapters: language-model targets only, save/load round trip, merge, hashes, refusals."""

# ruff: noqa: F811 - fixtures imported from tests/model_factory.py are test parameters by design

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from medvqa.errors import AdapterMismatch, NotFound
from medvqa.model.adapters import (
    LoraSettings,
    adapter_sha256,
    attach_lora,
    load_adapter,
    merge_adapter,
    save_adapter,
)
from medvqa.model.generation import answer, build_inputs
from medvqa.model.loading import MODEL_REF_ATTRIBUTE, LoadedModel, load_vlm, weights_sha256
from medvqa.model.prompts import load_prompt
from tests.model_factory import FAMILIES, sample_image, tiny_checkpoints, torch_single_thread  # noqa: F401 - pytest fixtures
from tests.test_model_loading import HAS_TORCHVISION

LANGUAGE_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
SMALL = LoraSettings(r=4, alpha=8, dropout=0.0)


def _load_base(folder: Path) -> LoadedModel:
    """load_vlm, or for Qwen2-VL without torchvision the same model without a processor (LoRA needs none)."""
    if (folder / "processor_config.json").read_text().count("Qwen2VL") and not HAS_TORCHVISION:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
        ref = f"{folder.name}@{weights_sha256(folder)[:12]}"
        setattr(model, MODEL_REF_ATTRIBUTE, ref)
        return LoadedModel(model=model, processor=None, model_ref=ref, device="cpu", dtype="float32")
    return load_vlm(folder, device="cpu")


def _inputs(loaded: LoadedModel, folder: Path, image: Image.Image) -> Any:
    """Model inputs for one question; built by hand from the tokenizer and image processor for Qwen2-VL."""
    if loaded.processor is not None:
        return build_inputs(loaded, load_prompt(), image, "Is there a fracture?")
    from transformers import AutoImageProcessor, AutoTokenizer

    pixels = AutoImageProcessor.from_pretrained(folder, local_files_only=True)(images=[image], return_tensors="pt")
    slots = "<|image_pad|>" * (int(pixels["image_grid_thw"].prod()) // 4)
    text = f"<|vision_start|>{slots}<|vision_end|>Is there a fracture?"
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokens = tokenizer(text, return_tensors="pt")
    image_slots = tokens["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return {**tokens, **pixels, "mm_token_type_ids": image_slots.long()}


def _logits(model: Any, inputs: Any) -> torch.Tensor:
    with torch.inference_mode():
        logits: torch.Tensor = model(**inputs).logits
    return logits


def _nudge_lora_b(model: Any) -> None:
    """A training-free change: every lora_B becomes non-zero, so the adapter now alters the output."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


@pytest.mark.parametrize(
    "kwargs", [{"r": 0}, {"r": -2}, {"alpha": 0}, {"dropout": 1.0}, {"dropout": -0.1}, {"target_modules": "("}]
)
def test_lora_settings_refuse_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LoraSettings(**kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_language_model_linears_are_targeted(family: str, tiny_checkpoints: Callable[[str], Path]) -> None:
    base = _load_base(tiny_checkpoints(family))
    layers = base.model.config.get_text_config().num_hidden_layers
    peft_model = attach_lora(base.model, SMALL)
    adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    assert len(adapted) == len(LANGUAGE_PROJECTIONS) * layers
    assert {name.rsplit(".", 1)[1] for name in adapted} == LANGUAGE_PROJECTIONS
    for name in adapted:
        assert re.search(r"\.(language_model|text_model)\.layers\.\d+\.", name), name
        assert not re.search(r"vision|visual|projector|connector|merger|lm_head", name), name


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_merge_reproduce_the_adapted_logits(
    family: str, tiny_checkpoints: Callable[[str], Path], sample_image: Image.Image, tmp_path: Path
) -> None:
    folder = tiny_checkpoints(family)
    trained = _load_base(folder)
    inputs = _inputs(trained, folder, sample_image)
    base_logits = _logits(trained.model, inputs)
    peft_model = attach_lora(trained.model, SMALL)
    assert torch.equal(_logits(peft_model, inputs), base_logits)  # fresh LoRA (B = 0) is a no-op
    _nudge_lora_b(peft_model)
    adapted_logits = _logits(peft_model.eval(), inputs)
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)

    adapter_ref = save_adapter(peft_model, tmp_path / "adapter")
    assert sorted(path.name for path in (tmp_path / "adapter").glob("adapter_*")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert adapter_ref == hashlib.sha256((tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert save_adapter(peft_model, tmp_path / "again") == adapter_ref == adapter_sha256(tmp_path / "adapter")

    reloaded = load_adapter(_load_base(folder), tmp_path / "adapter")
    assert reloaded.adapter_ref == adapter_ref and reloaded.model_ref == trained.model_ref
    assert torch.equal(_logits(reloaded.model, inputs), adapted_logits)
    merged = merge_adapter(reloaded.model)
    assert not hasattr(merged, "peft_config")
    assert torch.allclose(_logits(merged, inputs), adapted_logits, atol=1e-4)


def test_answers_name_the_loaded_adapter(
    tiny_checkpoints: Callable[[str], Path], sample_image: Image.Image, tmp_path: Path
) -> None:
    peft_model = attach_lora(load_vlm(tiny_checkpoints("llava")).model, SMALL)
    adapter_ref = save_adapter(peft_model, tmp_path / "adapter")
    loaded = load_adapter(load_vlm(tiny_checkpoints("llava")), tmp_path / "adapter")
    result = answer(loaded, sample_image, "Is there a fracture?")
    assert (result.adapter_ref, result.model_ref) == (adapter_ref, loaded.model_ref)


@pytest.fixture(scope="module")
def llava_adapter(tiny_checkpoints: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter trained (nudged) on the tiny LLaVA base."""
    peft_model = attach_lora(load_vlm(tiny_checkpoints("llava")).model, SMALL)
    _nudge_lora_b(peft_model)
    folder = tmp_path_factory.mktemp("llava-adapter")
    save_adapter(peft_model, folder)
    return folder


@pytest.mark.parametrize("family", ["idefics3", "gemma3"])
def test_adapter_for_another_base_is_refused_naming_both(
    family: str, llava_adapter: Path, tiny_checkpoints: Callable[[str], Path]
) -> None:
    other = _load_base(tiny_checkpoints(family))
    llava_ref = json.loads((llava_adapter / "adapter_config.json").read_text())["revision"]
    with pytest.raises(AdapterMismatch) as caught:
        load_adapter(other, llava_adapter)
    assert llava_ref in str(caught.value) and other.model_ref in str(caught.value)


def test_retrained_base_of_the_same_family_is_refused(
    llava_adapter: Path, tiny_checkpoints: Callable[[str], Path], tmp_path: Path
) -> None:
    from tests.model_factory import build_tiny_vlm

    retrained = build_tiny_vlm("llava", tmp_path / tiny_checkpoints("llava").name, seed=3)
    with pytest.raises(AdapterMismatch, match="was trained on base"):
        load_adapter(load_vlm(retrained), llava_adapter)


def _copy_without_base(adapter: Path, target: Path) -> Path:
    """The adapter with its base record removed, as a third-party PEFT adapter would come."""
    shutil.copytree(adapter, target)
    config = json.loads((target / "adapter_config.json").read_text())
    config["revision"] = None
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


def test_modules_the_base_lacks_are_refused(
    llava_adapter: Path, tiny_checkpoints: Callable[[str], Path], tmp_path: Path
) -> None:
    anonymous = _copy_without_base(llava_adapter, tmp_path / "anonymous")
    with pytest.raises(AdapterMismatch, match=r"targets model\.language_model\.layers\.0\..*does not have"):
        load_adapter(load_vlm(tiny_checkpoints("idefics3")), anonymous)


def test_shapes_that_do_not_fit_are_refused(
    llava_adapter: Path, tiny_checkpoints: Callable[[str], Path], tmp_path: Path
) -> None:
    reshaped = _copy_without_base(llava_adapter, tmp_path / "reshaped")
    weights = load_file(reshaped / "adapter_model.safetensors")
    key = next(key for key in weights if key.endswith("q_proj.lora_A.weight"))
    weights[key] = torch.zeros(SMALL.r, 48)
    save_file(weights, reshaped / "adapter_model.safetensors")
    with pytest.raises(AdapterMismatch, match=r"lora_A of shape \[4, 48\] .*q_proj.*32->32"):
        load_adapter(load_vlm(tiny_checkpoints("llava")), reshaped)


def test_tensors_that_are_neither_lora_nor_modules_to_save_are_refused(
    llava_adapter: Path, tiny_checkpoints: Callable[[str], Path], tmp_path: Path
) -> None:
    smuggled = _copy_without_base(llava_adapter, tmp_path / "smuggled")
    weights = load_file(smuggled / "adapter_model.safetensors")
    weights["base_model.model.lm_head.weight"] = torch.zeros(3, 3)
    save_file(weights, smuggled / "adapter_model.safetensors")
    with pytest.raises(AdapterMismatch, match=r"lm_head\.weight, neither a LoRA matrix nor a module to save"):
        load_adapter(load_vlm(tiny_checkpoints("llava")), smuggled)


def test_a_base_that_already_has_an_adapter_is_refused(
    llava_adapter: Path, tiny_checkpoints: Callable[[str], Path]
) -> None:
    once = load_adapter(load_vlm(tiny_checkpoints("llava")), llava_adapter)
    with pytest.raises(AdapterMismatch, match="already carries an adapter"):
        load_adapter(once, llava_adapter)


def test_missing_adapter_folder_is_not_found(tiny_checkpoints: Callable[[str], Path], tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"adapter_config\.json"):
        load_adapter(load_vlm(tiny_checkpoints("llava")), tmp_path / "nothing")


@pytest.mark.parametrize(
    ("name", "targeted"),
    [
        ("model.language_model.layers.11.self_attn.q_proj", True),  # LLaVA, Qwen2-VL, PaliGemma, Gemma 3 (tf 5)
        ("model.text_model.layers.0.mlp.down_proj", True),  # Idefics3 / SmolVLM
        ("language_model.model.layers.3.mlp.gate_proj", True),  # transformers 4 layout
        ("model.visual.blocks.0.mlp.gate_proj", False),  # Qwen2.5-VL vision MLP shares the names
        ("model.vision_tower.encoder.layers.0.self_attn.q_proj", False),
        ("model.vision_model.encoder.layers.0.self_attn.v_proj", False),
        ("model.multi_modal_projector.linear_1", False),
        ("model.connector.modality_projection.proj", False),
        ("model.language_model.embed_tokens", False),
        ("lm_head", False),
    ],
)
def test_default_target_regex(name: str, targeted: bool) -> None:
    assert bool(re.fullmatch(LoraSettings().target_modules, name)) is targeted
