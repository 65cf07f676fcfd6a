"""Train the default model's own weights (stage 0, then the two LLaVA stages) and package them to ship.

The default model is SmolLM2-135M-Instruct behind a vision tower and projector that no one pre-trained, so the
recipe is the two-stage one of LLaVA and LLaVA-Med, on the only data at hand (VQA-RAD training questions),
after a stage that gives the tower something to see:

0. Image-level pre-training (`vision_pretrain.py`): the tower alone learns organ, modality and plane labels
   taken from the training questions, on augmented images. Without it the answer loss teaches a tower
   trained from scratch almost nothing, and the language model answers blind.
1. Alignment: the language model is frozen; the projector (and the tower, when stage 0 was skipped) learns,
   from the answer loss alone, to put image features where SmolLM2 can read them (VQA-RAD has no captions,
   so question/answer pairs stand in for LLaVA's caption pairs). Stages 1 and 2 also see the training set's
   modality and plane questions asked again about other images whose stage-0 label is known
   (`attribute_questions.py`), so that the answer's wording is tied to what the tower sees.
2. VQA tuning: LoRA on every language-model linear, with the vision tower and projector still training, each
   at its own learning rate.

The defaults are the recipe of the shipped weights (`medvqa/model/weights/default/recipe.json`): 85 minutes
on this project's 2-core CPU, most of it in stage 2.

The result is packaged in two parts (`package_weights`): the tower and projector (`vision.safetensors`), which
become part of the default model itself, and a LoRA-only PEFT folder (`lora/`). `build_trained_model` folds
both into a plain LLaVA checkpoint: that is what the workbench answers with, what vLLM serves without
`--enable-lora` tricks, and what later fine-tuning rounds put their own (LoRA-only) adapters on. Weights are
stored in float16 to fit the 50 MB the project may ship; building upcasts them to float32.

Run it as `python -m medvqa.training.default_recipe --help` (CPU or one GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvqa.errors import InvalidInput, InvalidSettings, ModelBuildError
from medvqa.hashing import file_sha256
from medvqa.model.adapters import LoraSettings, attach_lora, save_adapter
from medvqa.model.default_weights import LORA_FOLDER, RECIPE_RECORD, VISION_WEIGHTS, vision_modules
from medvqa.model.loading import load_vlm
from medvqa.model.prompts import DEFAULT_PROMPT_VERSION, load_prompt
from medvqa.training.attribute_questions import attribute_questions
from medvqa.training.collate import AnswerCollator
from medvqa.training.data import VQAExample, load_vqa_jsonl
from medvqa.training.metrics import normalize_answer
from medvqa.training.train import TrainSettings, VQADataset, trainer_for
from medvqa.training.vision_pretrain import pretrain_vision_tower

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RecipeSettings:
    """The stages' schedules; invalid values raise InvalidSettings (a ValueError) before any model is loaded."""

    pretrain_epochs: float = field(
        default=6.0, metadata={"help": "Stage 0 passes (tower on image-level labels, 8 views per image); 0 skips it."}
    )
    pretrain_lr: float = field(default=1e-3, metadata={"help": "Stage 0 learning rate of the tower and its heads."})
    align_epochs: float = field(default=0.25, metadata={"help": "Stage 1 passes (LM frozen); 0 skips stage 1."})
    align_lr: float = field(default=1e-3, metadata={"help": "Stage 1 learning rate of the tower and projector."})
    vqa_epochs: float = field(default=1.0, metadata={"help": "Stage 2 passes (LoRA + tower + projector)."})
    lora_lr: float = field(default=1e-3, metadata={"help": "Stage 2 learning rate of the LoRA weights."})
    vision_lr: float = field(default=2e-4, metadata={"help": "Stage 2 learning rate of the tower and projector."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank on every language-model linear."})
    batch_size: int = field(default=16, metadata={"help": "Examples per optimizer step."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of each stage spent warming up."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on norms or biases)."})
    seed: int = field(default=0, metadata={"help": "Seeds both stages (init, dropout, data order)."})
    dataloader_workers: int = field(default=0, metadata={"help": "Batch-preparing processes (GPU runs want some)."})
    attribute_questions: int = field(
        default=2,
        metadata={
            "help": "1: stages 1 and 2 also train on modality/plane questions moved between images; 2: also a "
            "yes/no question naming every other class, balanced by yes questions (every_class); 0: none."
        },
    )

    def __post_init__(self) -> None:
        if self.pretrain_epochs < 0 or self.align_epochs < 0 or not self.vqa_epochs > 0:
            raise InvalidSettings("pretrain_epochs and align_epochs must be >= 0 and vqa_epochs > 0")
        if self.attribute_questions not in (0, 1, 2):
            raise InvalidSettings(f"attribute_questions must be 0, 1 or 2, not {self.attribute_questions!r}")
        for name in ("pretrain_lr", "align_lr", "lora_lr", "vision_lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise InvalidSettings(f"{name} must be positive, not {getattr(self, name)!r}")
        LoraSettings(r=self.lora_r, alpha=2 * self.lora_r)  # validates the rank
        TrainSettings(batch_size=self.batch_size, seed=self.seed, warmup_ratio=self.warmup_ratio)

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(r=self.lora_r, alpha=2 * self.lora_r, dropout=0.05)


def holdout_split(
    examples: Sequence[VQAExample], fraction: float, seed: int = 0
) -> tuple[list[VQAExample], list[VQAExample]]:
    """(train, validation) for model selection inside the training file; the test file is never touched.

    VQA-RAD asks several phrasings of one question about one image (freeform, paraphrase, framed variants),
    all with the same answer. Holding out single rows would leave their twins in train and make validation
    a memory test, so whole (image, normalised answer) groups go to one side.
    """
    if not 0 < fraction < 1:
        raise InvalidInput(f"the validation fraction must be between 0 and 1, not {fraction}")
    groups: dict[tuple[str, str], list[VQAExample]] = {}
    for example in examples:
        groups.setdefault((example.image_path.name, normalize_answer(example.answer)), []).append(example)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    held: set[tuple[str, str]] = set()
    count = 0
    for key in keys:
        if count >= fraction * len(examples):
            break
        held.add(key)
        count += len(groups[key])
    train = [e for e in examples if (e.image_path.name, normalize_answer(e.answer)) not in held]
    validation = [e for e in examples if (e.image_path.name, normalize_answer(e.answer)) in held]
    return train, validation


def train_default_weights(
    base: Path,
    data: Path,
    output: Path,
    settings: RecipeSettings,
    *,
    validation_fraction: float = 0.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run both stages on the VQA file `data` from the untrained default model `base`; package into `output`.

    With `validation_fraction`, that share of `data` (grouped, see `holdout_split`) is kept out of training and
    scored at the end, for choosing between recipes without touching a test set. Returns the recipe record.
    """
    import torch
    from transformers import set_seed

    examples = load_vqa_jsonl(data)
    train, validation = examples, list[VQAExample]()
    if validation_fraction:
        train, validation = holdout_split(examples, validation_fraction, settings.seed)
    set_seed(settings.seed)
    loaded = load_vlm(base, device="cpu", dtype="float32")
    collator = AnswerCollator(loaded.processor, load_prompt(DEFAULT_PROMPT_VERSION))
    every_class = settings.attribute_questions == 2
    moved = attribute_questions(train, settings.seed, every_class=every_class) if settings.attribute_questions else []
    dataset = VQADataset(train + moved)
    model: Any = loaded.model
    stages: dict[str, Any] = {}
    started = time.perf_counter()
    if settings.pretrain_epochs > 0:
        stages["pretrain"] = pretrain_vision_tower(
            model,
            loaded.processor,
            train,
            epochs=settings.pretrain_epochs,
            learning_rate=settings.pretrain_lr,
            batch_size=settings.batch_size,
            seed=settings.seed,
            progress=progress,
        )
    if settings.align_epochs > 0:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        # LLaVA's stage 1 trains the projector alone; the tower joins only when stage 0 did not train it.
        parts = vision_modules(model)
        aligned = [parts["multi_modal_projector"]] + ([] if settings.pretrain_epochs > 0 else [parts["vision_tower"]])
        vision = [p for module in aligned for p in module.parameters()]
        for parameter in vision:
            parameter.requires_grad_(True)
        groups = _param_groups([(vision, settings.align_lr)], settings.weight_decay)
        stages["align"] = _run_stage(model, dataset, collator, settings, settings.align_epochs, groups, progress)
    peft_model = attach_lora(model, settings.lora)  # freezes everything, then adds trainable LoRA weights
    vision = [p for module in vision_modules(peft_model).values() for p in module.parameters()]
    for parameter in vision:
        parameter.requires_grad_(True)
    lora = [p for name, p in peft_model.named_parameters() if "lora_" in name]
    groups = _param_groups([(lora, settings.lora_lr), (vision, settings.vision_lr)], settings.weight_decay)
    stages["vqa"] = _run_stage(peft_model, dataset, collator, settings, settings.vqa_epochs, groups, progress)
    train_seconds = time.perf_counter() - started
    package_weights(peft_model, output)
    record: dict[str, Any] = {
        "recipe": asdict(settings),
        "base_model_ref": loaded.model_ref,
        "text_source": _text_source(base),
        "data_file": data.name,
        "data_sha256": file_sha256(data),
        "train_examples": len(train),
        "moved_attribute_questions": len(moved),
        "validation_examples": len(validation),
        "prompt_version": DEFAULT_PROMPT_VERSION,
        "stages": stages,
        "train_seconds": round(train_seconds, 1),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "versions": _versions(),
    }
    if validation:
        record["validation"] = _validate(peft_model, loaded, validation)
    (output / RECIPE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def _param_groups(parts: list[tuple[list[Any], float]], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: each part at its learning rate, decay on matrices only (not on norms, biases)."""
    groups = []
    for parameters, lr in parts:
        decay = [p for p in parameters if p.ndim >= 2]
        rest = [p for p in parameters if p.ndim < 2]
        groups += [
            {"params": decay, "lr": lr, "weight_decay": weight_decay},
            {"params": rest, "lr": lr, "weight_decay": 0.0},
        ]
    return [group for group in groups if group["params"]]


def _run_stage(
    model: Any,
    dataset: VQADataset,
    collator: AnswerCollator,
    settings: RecipeSettings,
    epochs: float,
    groups: list[dict[str, Any]],
    progress: bool,
) -> dict[str, Any]:
    """One stage through the transformers Trainer with our own parameter groups; returns its loss summary."""
    import torch

    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98))
    stage = TrainSettings(
        epochs=epochs,
        learning_rate=max(group["lr"] for group in groups),  # unused by our optimizer; kept for the record
        batch_size=settings.batch_size,
        seed=settings.seed,
        warmup_ratio=settings.warmup_ratio,
        dataloader_workers=settings.dataloader_workers,
    )
    with tempfile.TemporaryDirectory(prefix="medvqa-recipe-") as scratch:
        trainer = trainer_for(model, dataset, collator, stage, Path(scratch), progress, optimizer=optimizer)
        outcome = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "epochs": epochs,
        "steps": int(outcome.global_step),
        "train_loss": round(float(outcome.training_loss), 4),
        "final_loss": round(sum(tail) / len(tail), 4) if tail else None,
        "seconds": round(float(outcome.metrics.get("train_runtime", 0.0)), 1),
        "samples_per_second": round(float(outcome.metrics.get("train_samples_per_second", 0.0)), 2),
    }


def package_weights(peft_model: Any, output: Path) -> None:
    """Write `vision.safetensors` (float16 tower + projector) and the LoRA-only PEFT folder `lora/`."""
    from safetensors.torch import save_file

    output.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for part, module in vision_modules(peft_model).items():
        for name, tensor in module.state_dict().items():
            tensors[f"{part}.{name}"] = _to_float16(f"{part}.{name}", tensor)
    save_file(tensors, str(output / VISION_WEIGHTS), metadata={"format": "pt"})
    lora_dir = output / LORA_FOLDER
    save_adapter(peft_model, lora_dir)
    _halve_adapter(lora_dir)


def _to_float16(name: str, tensor: torch.Tensor) -> torch.Tensor:
    import torch

    limit = torch.finfo(torch.float16).max
    if tensor.is_floating_point() and bool(tensor.abs().max() > limit):
        raise ModelBuildError(f"{name} holds values beyond float16's range; it cannot be shipped in float16.")
    return tensor.detach().to("cpu", torch.float16 if tensor.is_floating_point() else tensor.dtype).contiguous()


def _halve_adapter(lora_dir: Path) -> None:
    """Rewrite the saved LoRA tensors in float16 (loading upcasts them to the base's dtype)."""
    from safetensors.torch import load_file, save_file

    weights = lora_dir / "adapter_model.safetensors"
    tensors = {name: _to_float16(name, tensor) for name, tensor in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})


def _validate(peft_model: Any, loaded: Any, validation: list[VQAExample]) -> dict[str, Any]:
    """Score the trained model (and its baselines) on the held-out training questions: headline figures, the
    baselines' headline figures, and the breakdown per question type."""
    import torch

    from medvqa.model.generation import answer_batch
    from medvqa.training.evaluate import Batched, compare_with_baselines
    from medvqa.training.metrics import Prediction

    device = "cuda" if torch.cuda.is_available() else "cpu"
    peft_model.eval().to(device)
    current = replace(loaded, model=peft_model, device=device)

    def many(images: Any, questions: Any) -> list[str | Prediction]:
        return [Prediction(a.text, a.confidence, a.confidence) for a in answer_batch(current, images, questions)]

    data = compare_with_baselines(validation, Batched(many, 8)).to_json()
    breakdowns = ("by_question_type", "by_organ")
    summary = {key: value for key, value in data.items() if key not in breakdowns}
    for baseline in ("blind", "shuffled"):  # their headline figures only
        if baseline in data:
            summary[baseline] = {key: value for key, value in data[baseline].items() if key not in breakdowns}
    return summary | {"by_question_type": data["by_question_type"]}


def _text_source(base: Path) -> Any:
    from medvqa.model.default_model import BUILD_RECORD

    record = base / BUILD_RECORD
    return json.loads(record.read_text(encoding="utf-8")).get("text_source") if record.is_file() else None


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `python -m medvqa.training.default_recipe --base DIR --data FILE --output DIR [options]`."""
    parser = argparse.ArgumentParser(
        prog="python -m medvqa.training.default_recipe", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--base", type=Path, required=True, help="The untrained default model (ensure_base_model).")
    parser.add_argument("--data", type=Path, required=True, help="VQA jsonl to train on (VQA-RAD train.jsonl).")
    parser.add_argument("--output", type=Path, required=True, help="Folder for vision.safetensors, lora/, recipe.json.")
    parser.add_argument("--validation-fraction", type=float, default=0.0, help="Held-out share of --data to score.")
    for name, spec in RecipeSettings.__dataclass_fields__.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(spec.default), default=spec.default)
    args = parser.parse_args(argv)
    settings = RecipeSettings(**{name: getattr(args, name) for name in RecipeSettings.__dataclass_fields__})
    record = train_default_weights(
        args.base, args.data, args.output, settings, validation_fraction=args.validation_fraction
    )
    print(
        json.dumps(
            {key: record[key] for key in ("stages", "train_seconds") if key in record}
            | {"validation": {k: v for k, v in record.get("validation", {}).items() if k != "by_question_type"}}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
