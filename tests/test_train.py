"""Adapter training with a real (tiny, random) LLaVA model and real VQA-RAD images."""

# ruff: noqa: F811 - fixtures imported from tests/model_factory.py are test parameters by design

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file

from medvqa.cli import main
from medvqa.model.adapters import LoraSettings, load_adapter
from medvqa.model.generation import build_inputs
from medvqa.model.loading import load_vlm
from medvqa.model.prompts import load_prompt
from medvqa.training.collate import IGNORE_INDEX, AnswerCollator, load_rgb
from medvqa.training.data import load_vqa_jsonl
from medvqa.training.train import TRAIN_RECORD, TrainSettings, train_adapter
from tests.model_factory import tiny_checkpoints, torch_single_thread  # noqa: F401 - pytest fixtures

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad" / "images"
ROWS = [
    ("Is there a fracture?", "no"),
    ("Is this an MRI?", "yes"),
    ("Where is the lesion?", "  left lung "),
    ("Which organ is shown?", "liver"),
]
LORA = LoraSettings(r=4, alpha=8, dropout=0.1)
QUICK = TrainSettings(max_steps=3, batch_size=2, learning_rate=1e-3)


@pytest.fixture
def data_file(tmp_path):
    if not IMAGES.is_dir():
        pytest.skip(f"VQA-RAD images not found at {IMAGES}")
    images = sorted(IMAGES.glob("*.jpg"))[:4]
    lines = [
        {"qid": str(i), "image": str(image), "question": q, "answer": a}
        for i, ((q, a), image) in enumerate(zip(ROWS, images, strict=True))
    ]
    path = tmp_path / "mini.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_settings_refuse_bad_values():
    for bad in ({"epochs": 0}, {"learning_rate": -1.0}, {"batch_size": 0}, {"max_steps": 0}, {"warmup_ratio": 1.0}):
        with pytest.raises(ValueError):
            TrainSettings(**bad)


def test_labels_cover_exactly_the_answer_and_its_end_marker(data_file, tiny_checkpoints):
    loaded = load_vlm(tiny_checkpoints("llava"), device="cpu", dtype="float32")
    template = load_prompt()
    collator = AnswerCollator(loaded.processor, template)
    examples = load_vqa_jsonl(data_file)
    batch = collator(examples)
    tokenizer = loaded.processor.tokenizer
    assert collator.end_marker == tokenizer.eos_token
    for row, example in enumerate(examples):
        labels = batch["labels"][row]
        kept = labels[labels != IGNORE_INDEX]
        assert tokenizer.decode(kept).strip() == example.answer.strip() + collator.end_marker
        # the masked prompt is token for token what answering feeds the model
        prompt = build_inputs(loaded, template, load_rgb(example.image_path), example.question)["input_ids"][0]
        assert torch.equal(batch["input_ids"][row, : len(prompt)], prompt)
        assert bool((labels[: len(prompt)] == IGNORE_INDEX).all()) and labels[len(prompt)] != IGNORE_INDEX


def test_training_lowers_the_loss_and_writes_a_record(data_file, tiny_checkpoints, tmp_path):
    settings = TrainSettings(max_steps=24, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, train_vision=False)
    result = train_adapter(tiny_checkpoints("llava"), data_file, tmp_path / "out", LORA, settings, progress=False)
    record = json.loads((tmp_path / "out" / TRAIN_RECORD).read_text())
    losses = record["loss_history"]
    assert result.steps == 24 and len(losses) == 24
    assert losses[-1] < losses[0] - 0.2, losses
    assert record["result"]["adapter_sha256"] == result.adapter_sha256 and record["seed"] == 0
    assert record["base_model_ref"] == load_vlm(tiny_checkpoints("llava"), device="cpu").model_ref
    assert len(record["data_sha256"]) == 64 and {"torch", "transformers", "peft"} <= set(record["versions"])


def test_same_seed_same_adapter_other_seed_other_adapter(data_file, tiny_checkpoints, tmp_path):
    base = tiny_checkpoints("llava")
    digests = [
        train_adapter(
            base,
            data_file,
            tmp_path / f"run{i}",
            LORA,
            TrainSettings(max_steps=3, batch_size=2, seed=seed),
            progress=False,
        ).adapter_sha256
        for i, seed in enumerate((0, 0, 1))
    ]
    assert digests[0] == digests[1] != digests[2]


def _logits(model, loaded, example):
    inputs = build_inputs(loaded, load_prompt(), load_rgb(example.image_path), example.question)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("train_vision", [False, True])
def test_saved_adapter_reproduces_the_trained_model(data_file, tiny_checkpoints, tmp_path, train_vision):
    base = tiny_checkpoints("llava")
    settings = TrainSettings(max_steps=3, batch_size=2, learning_rate=1e-2, train_vision=train_vision)
    result = train_adapter(base, data_file, tmp_path / "out", LORA, settings, progress=False)
    example = load_vqa_jsonl(data_file)[0]
    fresh = load_vlm(base, device="cpu", dtype="float32")
    untrained = _logits(fresh.model, fresh, example)
    reloaded = load_adapter(fresh, result.adapter_dir).model  # with train_vision, the tower rides in the file
    trained = PeftModel.from_pretrained(load_vlm(base, device="cpu", dtype="float32").model, str(result.adapter_dir))
    logits = _logits(reloaded, fresh, example)
    assert not torch.allclose(logits, untrained, atol=1e-4)
    assert torch.allclose(logits, _logits(trained.eval(), fresh, example), atol=1e-5)


def test_cli_trains_and_refuses_bad_data_in_one_line(db, cli_env, data_file, tiny_checkpoints, tmp_path):
    model = tiny_checkpoints("llava")
    args = ["train", "--data", data_file, "--output", tmp_path / "cli", "--model", model, "--max-steps", 2]
    result = CliRunner().invoke(main, [*map(str, args), "--batch-size", "2", "--rank", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == 2 and len(report["adapter_sha256"]) == 64
    assert {"adapter_dir", "train_loss", "samples_per_second", "seconds"} <= set(report)
    assert (Path(report["adapter_dir"]) / "adapter_model.safetensors").is_file()
    keys = load_file(str(Path(report["adapter_dir"]) / "adapter_model.safetensors"))
    assert keys and all("lora_" in key for key in keys)  # LoRA-only by default: what vLLM --enable-lora serves
    with_vision = CliRunner().invoke(
        main, [*map(str, args[:4]), str(tmp_path / "v"), *map(str, args[5:]), "--rank", "2", "--train-vision", "--json"]
    )
    assert with_vision.exit_code == 0, with_vision.output
    keys = load_file(str(tmp_path / "v" / "adapter_model.safetensors"))
    assert any("vision_tower" in key and "lora_" not in key for key in keys)  # the tower rides in the adapter
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    bad = CliRunner().invoke(
        main, ["train", "--data", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "x"), "--model", str(model)]
    )
    assert bad.exit_code == 1 and bad.stderr.startswith("medvqa: error:") and "bad.jsonl line 1" in bad.stderr
    assert bad.stderr.count("\n") == 1


def test_gradient_checkpointing_trains_the_same_adapter(data_file, tiny_checkpoints, tmp_path, torch_single_thread):
    """Recomputing activations must not change what is learnt: same seed, same adapter bytes."""
    model = tiny_checkpoints("llava")
    plain = TrainSettings(max_steps=3, batch_size=2, learning_rate=1e-2, seed=3)
    checkpointed = TrainSettings(max_steps=3, batch_size=2, learning_rate=1e-2, seed=3, gradient_checkpointing=True)
    first = train_adapter(model, data_file, tmp_path / "plain", LORA, plain, progress=False)
    second = train_adapter(model, data_file, tmp_path / "ckpt", LORA, checkpointed, progress=False)
    assert second.train_loss == pytest.approx(first.train_loss, rel=1e-5)
    assert second.adapter_sha256 == first.adapter_sha256
    record = json.loads((tmp_path / "ckpt" / TRAIN_RECORD).read_text())
    assert record["train_settings"]["gradient_checkpointing"] is True


def test_four_bit_loading_quantizes_the_language_model_only(tiny_checkpoints):
    from bitsandbytes.nn import Linear4bit

    loaded = load_vlm(tiny_checkpoints("llava"), device="cpu", dtype="float32", quantize_4bit=True)
    kinds = {name: type(module) for name, module in loaded.model.named_modules() if isinstance(module, torch.nn.Linear)}
    language = [name for name in kinds if ".language_model." in name]
    assert language and all(issubclass(kinds[name], Linear4bit) for name in language)
    others = [name for name in kinds if ".language_model." not in name]  # tower, projector, lm_head
    assert others and not any(issubclass(kinds[name], Linear4bit) for name in others)
    assert loaded.model_ref == load_vlm(tiny_checkpoints("llava"), device="cpu").model_ref  # same checkpoint


def test_qlora_trains_an_ordinary_adapter_of_the_full_precision_base(data_file, tiny_checkpoints, tmp_path):
    base = tiny_checkpoints("llava")
    settings = TrainSettings(max_steps=12, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, quantize_4bit=True)
    result = train_adapter(base, data_file, tmp_path / "out", LORA, settings, progress=False)
    record = json.loads((tmp_path / "out" / TRAIN_RECORD).read_text())
    assert record["train_settings"]["quantize_4bit"] is True
    losses = record["loss_history"]
    assert result.steps == 12 and losses[-1] < losses[0], losses
    tensors = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert tensors and all("lora_" in name and ".language_model." in name for name in tensors)  # LoRA-only
    example = load_vqa_jsonl(data_file)[0]
    fresh = load_vlm(base, device="cpu", dtype="float32")  # served in full precision, as QLoRA adapters are
    untrained = _logits(fresh.model, fresh, example)
    adapted = load_adapter(fresh, result.adapter_dir)
    assert not torch.allclose(_logits(adapted.model, adapted, example), untrained, atol=1e-4)


def test_four_bit_without_bitsandbytes_is_refused_in_one_line(tiny_checkpoints, monkeypatch):
    import importlib.util

    from medvqa.errors import ModelError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ModelError, match=r"needs the bitsandbytes package: pip install 'medvqa\[qlora\]'") as caught:
        load_vlm(tiny_checkpoints("llava"), device="cpu", dtype="float32", quantize_4bit=True)
    assert "\n" not in str(caught.value)
