"""Fine-tune a LoRA adapter (and optionally the vision tower and projector) on a VQA JSON Lines file.

The transformers `Trainer` runs the loop; `collate.AnswerCollator` renders each prompt exactly as answering
does and puts the loss on the answer tokens only. Runs are seeded (model init, LoRA init, dropout, data order),
so two CPU runs with the same seed write byte-identical adapters. The result is a standard PEFT folder written
by `save_adapter`, plus `train_record.json` with the settings, the data file's SHA-256, the base model_ref and
the library versions. On GPUs, run it under accelerate: `accelerate launch --no_python medvqa train ...`.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvqa.errors import InvalidSettings
from medvqa.hashing import file_sha256
from medvqa.model.adapters import LoraSettings, attach_lora, save_adapter
from medvqa.model.loading import load_vlm
from medvqa.model.prompts import DEFAULT_PROMPT_VERSION, load_prompt
from medvqa.training.collate import AnswerCollator
from medvqa.training.data import VQAExample, load_vqa_jsonl

if TYPE_CHECKING:
    from peft import PeftModel

TRAIN_RECORD = "train_record.json"
# Vision towers and projectors of the supported families (transformers 5 names), trained in full with train_vision.
VISION_MODULES = ("vision_tower", "vision_model", "visual", "multi_modal_projector", "connector")


@dataclass(frozen=True)
class TrainSettings:
    """How to train; invalid values raise InvalidSettings here, before any model is loaded."""

    epochs: float = field(default=1.0, metadata={"help": "Passes over the data (>0); ignored when max_steps > 0."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak AdamW learning rate (>0), linear decay."})
    batch_size: int = field(default=8, metadata={"help": "Examples per device per forward pass (>=1)."})
    gradient_accumulation: int = field(default=1, metadata={"help": "Forward passes per optimizer step (>=1)."})
    seed: int = field(default=0, metadata={"help": "Seeds model/LoRA init, dropout and data order (>=0)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps to run; -1 means use epochs."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Share of the steps spent warming up, in [0, 1)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (>=0)."})
    dataloader_workers: int = field(
        default=0, metadata={"help": "Processes preparing batches (0: the training process does it)."}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass: less memory (7B bases), about 30% slower."},
    )
    quantize_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA: train on a base whose language model is held in 4-bit NF4 (bitsandbytes), for 7B+ "
            "bases on small GPUs. The adapter is an ordinary LoRA folder of the same base."
        },
    )
    train_vision: bool = field(
        default=False,
        metadata={
            "help": "Also train the vision tower and projector in full (PEFT modules_to_save). Off by default: "
            "such an adapter is not LoRA-only, so vLLM's --enable-lora cannot serve it; the vision side belongs "
            "to the base (see medvqa.training.default_recipe)."
        },
    )

    def __post_init__(self) -> None:
        for name in ("batch_size", "gradient_accumulation", "seed", "max_steps", "dataloader_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidSettings(f"{name} must be an integer, not {value!r}")
        if self.batch_size < 1 or self.gradient_accumulation < 1:
            raise InvalidSettings("batch_size and gradient_accumulation must be at least 1")
        if self.dataloader_workers < 0:
            raise InvalidSettings(f"dataloader_workers must be >= 0, not {self.dataloader_workers}")
        if self.seed < 0 or (self.max_steps < 1 and self.max_steps != -1):
            raise InvalidSettings(f"seed must be >= 0 and max_steps -1 or positive, not {self.seed}, {self.max_steps}")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise InvalidSettings(f"epochs must be positive, not {self.epochs!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InvalidSettings(f"learning_rate must be positive, not {self.learning_rate!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise InvalidSettings(f"warmup_ratio must be in [0, 1), not {self.warmup_ratio!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InvalidSettings(f"weight_decay must be >= 0, not {self.weight_decay!r}")


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced and how it went."""

    adapter_dir: Path  # the PEFT folder (adapter_config.json + adapter_model.safetensors)
    adapter_sha256: str  # SHA-256 of adapter_model.safetensors: the adapter_ref answers will carry
    train_loss: float  # mean training loss over all steps, as the Trainer reports it
    steps: int  # optimizer steps taken
    samples_per_second: float  # training throughput
    seconds: float  # training wall time (excludes loading and saving)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (the path as text)."""
        return {**asdict(self), "adapter_dir": str(self.adapter_dir)}


class VQADataset:
    """A map-style dataset of VQAExample (images are read by the collator)."""

    def __init__(self, examples: list[VQAExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> VQAExample:
        return self.examples[index]


def train_adapter(
    base: Path, data: Path, output: Path, lora: LoraSettings, settings: TrainSettings, *, progress: bool = True
) -> TrainResult:
    """Train an adapter for the checkpoint `base` on the VQA file `data`; write it and its record to `output`."""
    from transformers import set_seed

    examples = load_vqa_jsonl(data)
    set_seed(settings.seed)
    if settings.quantize_4bit:  # bitsandbytes places the 4-bit weights at load time; the Trainer cannot move them
        loaded = load_vlm(base, device=_process_device(), dtype="auto", quantize_4bit=True)
    else:
        loaded = load_vlm(base, device="cpu", dtype="float32")  # the Trainer moves it and uses mixed precision
    model = _attach(loaded.model, lora, settings)
    collator = AnswerCollator(loaded.processor, load_prompt(DEFAULT_PROMPT_VERSION))
    with tempfile.TemporaryDirectory(prefix="medvqa-train-") as scratch:
        trainer = trainer_for(model, VQADataset(examples), collator, settings, Path(scratch), progress)
        outcome = trainer.train()
    output.mkdir(parents=True, exist_ok=True)
    digest = save_adapter(trainer.model, output) if trainer.is_world_process_zero() else ""  # rank 0 writes
    metrics = outcome.metrics
    result = TrainResult(
        adapter_dir=output,
        adapter_sha256=digest,
        train_loss=float(outcome.training_loss),
        steps=int(outcome.global_step),
        samples_per_second=float(metrics.get("train_samples_per_second", 0.0)),
        seconds=float(metrics.get("train_runtime", 0.0)),
    )
    if trainer.is_world_process_zero():
        _write_record(output, data, loaded.model_ref, settings, lora, result, trainer.state.log_history)
    return result


def _process_device() -> str:
    """This process's GPU under `accelerate launch` (one per process, as DDP wants), else the CPU."""
    import torch
    from accelerate import PartialState  # type: ignore[import-untyped]

    return f"cuda:{PartialState().local_process_index}" if torch.cuda.is_available() else "cpu"


def _attach(model: Any, lora: LoraSettings, settings: TrainSettings) -> PeftModel:
    """LoRA on the language model; with train_vision the vision tower and projector become modules_to_save."""
    from peft import prepare_model_for_kbit_training
    from peft.tuners.tuners_utils import BaseTuner
    from peft.utils.other import set_additional_trainable_modules

    if settings.quantize_4bit:  # casts norms to float32 and lets gradients reach the LoRA inputs
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=settings.gradient_checkpointing
        )
    peft_model = attach_lora(model, lora)
    if settings.train_vision:
        present = {name.rpartition(".")[2] for name, _ in model.named_modules()}
        config: Any = peft_model.peft_config["default"]  # a LoraConfig
        config.modules_to_save = sorted(present & set(VISION_MODULES))
        if config.modules_to_save:
            set_additional_trainable_modules(
                model=peft_model.base_model,
                peft_config=config,
                model_config=BaseTuner.get_model_config(peft_model),
                adapter_name="default",
            )
    return peft_model


def trainer_for(
    model: Any,
    dataset: Any,
    collator: Any,
    settings: TrainSettings,
    scratch: Path,
    progress: bool,
    optimizer: Any = None,
) -> Any:
    """A Trainer configured for reproducible training: no checkpoints, no reporting.

    `optimizer` (with its own parameter groups and learning rates) replaces the Trainer's AdamW; the Trainer
    still builds the warmup + linear decay schedule around it.
    """
    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(scratch),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation,
        warmup_steps=settings.warmup_ratio,
        weight_decay=settings.weight_decay,
        lr_scheduler_type="linear",
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=bf16,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=not progress,
        remove_unused_columns=False,
        dataloader_num_workers=settings.dataloader_workers,
        **_checkpointing(settings.gradient_checkpointing),
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, optimizers=(optimizer, None)
    )
    if not progress:  # without tqdm the Trainer prints each log line; keep stdout clean for --json
        trainer.remove_callback(PrinterCallback)
    return trainer


def _checkpointing(enabled: bool) -> dict[str, Any]:
    """TrainingArguments for activation recomputation, named so transformers 5.0 and later take them."""
    import transformers

    if not enabled:
        return {}
    # The reentrant form breaks with frozen inputs (LoRA); newer transformers renamed the arguments.
    if "activation_checkpointing" in getattr(transformers.TrainingArguments, "__dataclass_fields__", {}):
        return {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}}
    return {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}


def _write_record(
    output: Path,
    data: Path,
    model_ref: str,
    settings: TrainSettings,
    lora: LoraSettings,
    result: TrainResult,
    log_history: list[dict[str, Any]],
) -> None:
    """output/train_record.json: enough to say what was trained on what, with which code, and how it went."""
    import peft
    import torch
    import transformers

    data_sha256 = file_sha256(data)
    record = {
        "base_model_ref": model_ref,
        "data_file": str(data),
        "data_sha256": data_sha256,
        "seed": settings.seed,
        "train_settings": asdict(settings),
        "lora_settings": asdict(lora),
        "prompt_version": DEFAULT_PROMPT_VERSION,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "result": result.as_dict(),
        "loss_history": [entry["loss"] for entry in log_history if "loss" in entry],
    }
    (output / TRAIN_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
