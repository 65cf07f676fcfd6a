"""The default model's two-stage recipe: validation split, both stages, packaging and folding, on a tiny LLaVA."""

# ruff: noqa: F811 - fixtures imported from tests/model_factory.py are test parameters by design

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from medvqa.errors import InvalidInput, ModelBuildError
from medvqa.model.adapters import LoraSettings, attach_lora
from medvqa.model.default_weights import apply_packaged_weights, vision_modules
from medvqa.model.generation import build_inputs
from medvqa.model.loading import load_vlm
from medvqa.model.prompts import load_prompt
from medvqa.training.attribute_questions import attribute_questions
from medvqa.training.data import VQAExample, load_vqa_jsonl
from medvqa.training.default_recipe import (
    LORA_FOLDER,
    RECIPE_RECORD,
    VISION_WEIGHTS,
    RecipeSettings,
    holdout_split,
    main,
    package_weights,
    train_default_weights,
)
from medvqa.training.metrics import normalize_answer
from tests.model_factory import sample_image, tiny_checkpoints, torch_single_thread  # noqa: F401 - fixtures

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad" / "images"


def _example(index: int, image: str, answer: str) -> VQAExample:
    return VQAExample(
        qid=str(index),
        image_path=Path(f"/data/{image}.jpg"),
        question=f"question {index}?",
        answer=answer,
        answer_type="OPEN",
        question_type="PRES",
        organ="HEAD",
    )


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from("abcdef"), st.sampled_from(["Yes", "yes", "no", "left lung"])), max_size=60
    ),
    fraction=st.floats(min_value=0.05, max_value=0.5),
    seed=st.integers(min_value=0, max_value=5),
)
def test_holdout_keeps_each_image_answer_group_on_one_side(rows, fraction, seed):
    examples = [_example(i, image, answer) for i, (image, answer) in enumerate(rows)]
    train, validation = holdout_split(examples, fraction, seed)
    assert sorted(e.qid for e in train + validation) == sorted(e.qid for e in examples)  # a partition
    group = lambda e: (e.image_path.name, normalize_answer(e.answer))  # noqa: E731
    assert not {group(e) for e in train} & {group(e) for e in validation}  # "Yes" and "yes" are one group
    if examples:
        assert validation  # at least one group is held out, however small the fraction
    assert holdout_split(examples, fraction, seed) == (train, validation)  # deterministic


def test_holdout_refuses_a_fraction_outside_zero_one():
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(InvalidInput, match="between 0 and 1"):
            holdout_split([], bad)


def test_settings_refuse_bad_values():
    bad_values = (
        {"vqa_epochs": 0},
        {"align_epochs": -1},
        {"pretrain_epochs": -1},
        {"pretrain_lr": 0.0},
        {"lora_lr": 0.0},
        {"lora_r": 0},
        {"batch_size": 0},
    )
    for bad in bad_values:
        with pytest.raises(ValueError):
            RecipeSettings(**bad)


def _logits(model, loaded, image) -> torch.Tensor:
    inputs = build_inputs(loaded, load_prompt(), image, "Is there a mass?")
    with torch.no_grad():
        return model(**inputs).logits[0, -1]


def test_packaged_weights_fold_into_a_fresh_base_with_the_same_outputs(
    tiny_checkpoints, sample_image, tmp_path, torch_single_thread
):
    base = tiny_checkpoints("llava")
    trained = load_vlm(base, device="cpu", dtype="float32")
    peft_model = attach_lora(trained.model, LoraSettings(r=4, alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():  # stand-ins for training: move every LoRA and vision weight
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.1)
        for module in vision_modules(peft_model).values():
            for parameter in module.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)
    peft_model.eval()
    expected = _logits(peft_model, trained, sample_image)
    package_weights(peft_model, tmp_path / "pkg")

    saved = load_file(str(tmp_path / "pkg" / VISION_WEIGHTS))
    assert {name.split(".")[0] for name in saved} == {"vision_tower", "multi_modal_projector"}
    assert all(t.dtype == torch.float16 for t in saved.values())
    adapter = load_file(str(tmp_path / "pkg" / LORA_FOLDER / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)  # LoRA only: no modules_to_save copies
    assert all(t.dtype == torch.float16 for t in adapter.values())

    fresh = load_vlm(base, device="cpu", dtype="float32")
    untouched = _logits(fresh.model, fresh, sample_image)
    merged = apply_packaged_weights(fresh.model, tmp_path / "pkg").eval()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    got = _logits(merged, fresh, sample_image)
    assert torch.allclose(got, expected, atol=2e-2), (got - expected).abs().max()
    assert not torch.allclose(untouched, expected, atol=2e-2)  # the package really changes the model


def test_a_package_for_another_shape_is_refused_in_one_line(tiny_checkpoints, tmp_path, torch_single_thread):
    loaded = load_vlm(tiny_checkpoints("llava"), device="cpu", dtype="float32")
    package_weights(attach_lora(loaded.model, LoraSettings(r=4, alpha=8)), tmp_path / "pkg")
    weights = load_file(str(tmp_path / "pkg" / VISION_WEIGHTS))
    first = sorted(weights)[0]
    weights[first] = torch.zeros(3, 3, dtype=torch.float16)
    from safetensors.torch import save_file

    save_file(weights, str(tmp_path / "pkg" / VISION_WEIGHTS))
    fresh = load_vlm(tiny_checkpoints("llava"), device="cpu", dtype="float32")
    with pytest.raises(ModelBuildError, match="does not fit this model's") as caught:
        apply_packaged_weights(fresh.model, tmp_path / "pkg")
    assert "\n" not in str(caught.value).split(":")[0]


def test_weights_beyond_float16_are_refused(tiny_checkpoints, tmp_path, torch_single_thread):
    loaded = load_vlm(tiny_checkpoints("llava"), device="cpu", dtype="float32")
    peft_model = attach_lora(loaded.model, LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        next(vision_modules(peft_model)["multi_modal_projector"].parameters()).fill_(1e6)
    with pytest.raises(ModelBuildError, match="float16"):
        package_weights(peft_model, tmp_path / "pkg")


@pytest.fixture
def data_file(tmp_path):
    if not IMAGES.is_dir():
        pytest.skip(f"VQA-RAD images not found at {IMAGES}")
    images = sorted(IMAGES.glob("*.jpg"))[:4]
    rows = [("Is there a fracture?", "no"), ("Is this an MRI?", "yes"), ("Where?", "left lung"), ("Organ?", "liver")]
    lines = [
        {"qid": str(i), "image": str(image), "question": q, "answer": a, "answer_type": "CLOSED" if i < 2 else "OPEN"}
        for i, ((q, a), image) in enumerate(zip(rows * 2, images * 2, strict=True))
    ]
    path = tmp_path / "mini.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_both_stages_run_and_leave_a_package_and_a_record(data_file, tiny_checkpoints, tmp_path, torch_single_thread):
    base = tiny_checkpoints("llava")
    recipe = RecipeSettings(pretrain_epochs=1, align_epochs=1, vqa_epochs=1, batch_size=4, lora_r=4)
    record = train_default_weights(base, data_file, tmp_path / "out", recipe, validation_fraction=0.25, progress=False)

    assert set(record["stages"]) == {"pretrain", "align", "vqa"}
    assert set(record["stages"]["pretrain"]["train_accuracy"]) == {"organ", "modality", "plane"}
    assert record["stages"]["align"]["steps"] >= 1 and record["stages"]["vqa"]["steps"] >= 1
    assert record["train_examples"] + record["validation_examples"] == 8 and record["validation_examples"] >= 1
    kept, _ = holdout_split(load_vqa_jsonl(data_file), 0.25, recipe.seed)
    moved = attribute_questions(kept, recipe.seed)  # "Is this an MRI?" yes: that image is asked it again
    assert moved and record["moved_attribute_questions"] == len(moved)
    assert record["validation"]["counts"]["n"] == record["validation_examples"]
    assert "closed_accuracy" in record["validation"]["blind"] and "by_organ" not in record["validation"]["blind"]
    by_type = record["validation"]["by_question_type"]
    assert sum(group["counts"]["n"] for group in by_type.values()) == record["validation_examples"]
    assert "by_organ" not in record["validation"]
    assert json.loads((tmp_path / "out" / RECIPE_RECORD).read_text())["data_sha256"] == record["data_sha256"]

    fresh = load_vlm(base, device="cpu", dtype="float32")
    before = {n: p.clone() for n, p in fresh.model.named_parameters()}
    merged = apply_packaged_weights(fresh.model, tmp_path / "out")
    after = dict(merged.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any("vision_tower" in n for n in changed) and any("multi_modal_projector" in n for n in changed)
    assert any("language_model" in n and "layers" in n for n in changed)  # the merged LoRA


def test_stage_one_alone_leaves_the_language_model_frozen(data_file, tiny_checkpoints, tmp_path, torch_single_thread):
    """With vqa learning rates near zero, what the package changes in the LM comes from stage 2 alone."""
    base = tiny_checkpoints("llava")
    recipe = RecipeSettings(
        pretrain_epochs=0, align_epochs=1, vqa_epochs=1, batch_size=4, lora_r=4, lora_lr=1e-30, vision_lr=1e-30
    )
    train_default_weights(base, data_file, tmp_path / "out", recipe, progress=False)
    fresh = load_vlm(base, device="cpu", dtype="float32")
    before = {n: p.clone() for n, p in fresh.model.named_parameters()}
    merged = apply_packaged_weights(fresh.model, tmp_path / "out")
    lm = [n for n in before if "language_model" in n or "lm_head" in n]
    # LoRA B starts at zero and barely moves, so the merged LM equals the base (fp16 rounding of ~0 is 0).
    assert all(torch.allclose(before[n], dict(merged.named_parameters())[n], atol=1e-6) for n in lm)
    vision = [n for n in before if "vision_tower" in n]
    assert any(not torch.equal(before[n], dict(merged.named_parameters())[n]) for n in vision)  # stage 1 trained


def test_after_stage_zero_stage_one_trains_the_projector_and_leaves_the_tower(
    data_file, tiny_checkpoints, tmp_path, torch_single_thread, monkeypatch
):
    """LLaVA's stage 1 (projector only) once stage 0 has trained the tower; stage 2 is held still here."""
    import medvqa.training.default_recipe as recipe_module

    snapshots = {}
    real = recipe_module.pretrain_vision_tower

    def pretrain_and_snapshot(model, *args, **kwargs):
        summary = real(model, *args, **kwargs)
        for part, module in vision_modules(model).items():
            snapshots.update({f"{part}.{n}": t.detach().clone() for n, t in module.state_dict().items()})
        return summary

    monkeypatch.setattr(recipe_module, "pretrain_vision_tower", pretrain_and_snapshot)
    recipe = RecipeSettings(
        pretrain_epochs=1, align_epochs=1, vqa_epochs=1, batch_size=4, lora_r=4, lora_lr=1e-30, vision_lr=1e-30
    )
    train_default_weights(tiny_checkpoints("llava"), data_file, tmp_path / "out", recipe, progress=False)

    saved = load_file(str(tmp_path / "out" / VISION_WEIGHTS))
    tower = [n for n in saved if n.startswith("vision_tower.")]
    projector = [n for n in saved if n.startswith("multi_modal_projector.")]
    assert tower and all(torch.equal(saved[n], snapshots[n].half()) for n in tower)  # as stage 0 left it
    assert any(not torch.equal(saved[n], snapshots[n].half()) for n in projector)  # stage 1 moved it


def test_command_line_runs_the_recipe(data_file, tiny_checkpoints, tmp_path, torch_single_thread, capsys):
    code = main(
        [
            "--base",
            str(tiny_checkpoints("llava")),
            "--data",
            str(data_file),
            "--output",
            str(tmp_path / "cli"),
            "--pretrain-epochs",
            "0",
            "--align-epochs",
            "0",
            "--vqa-epochs",
            "1",
            "--batch-size",
            "4",
            "--lora-r",
            "4",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed["stages"]) == {"vqa"}  # --pretrain-epochs 0 and --align-epochs 0 skip stages 0 and 1
    assert (tmp_path / "cli" / VISION_WEIGHTS).is_file() and (tmp_path / "cli" / LORA_FOLDER).is_dir()
