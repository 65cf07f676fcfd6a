"""LoRA adapters through PEFT: attach to the language model only, save, verify and load, merge.

Adapters are plain PEFT folders (`adapter_config.json` + `adapter_model.safetensors`), loadable by vLLM
`--enable-lora`. Only the language model's linear layers are adapted: the vision tower and the projector stay
as the base has them, so an adapter is small and cannot change how images are encoded. The base weights an
adapter was trained on are recorded in PEFT's `revision` field (the base's model_ref) and checked on load.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvqa.errors import AdapterMismatch, InvalidSettings, ModelError, NotFound
from medvqa.hashing import file_sha256
from medvqa.model.loading import MODEL_REF_ATTRIBUTE, LoadedModel

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Decoder layers of the language model in every supported family (transformers 5 names):
# LLaVA / Qwen2-VL / PaliGemma / Gemma 3: model.language_model.layers.N...; Idefics3 / SmolVLM: model.text_model...
# Vision towers (vision_tower, vision_model, visual) and projectors never match, even where their MLPs share
# the projection names (Qwen2.5-VL's vision blocks have gate/up/down_proj too).
LANGUAGE_MODEL_LINEAR = (
    r".*\b(?:language_model|text_model)(?:\.model)?\.layers\.\d+\."
    r"(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"
)
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adaptation settings; invalid values raise InvalidSettings here, before any model is touched."""

    r: int = field(default=16, metadata={"help": "Rank of the update matrices (>0): capacity and adapter size."})
    alpha: int = field(default=32, metadata={"help": "Scaling numerator (>0): the update is scaled by alpha / r."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input during training, in [0, 1)."})
    target_modules: str = field(
        default=LANGUAGE_MODEL_LINEAR,
        metadata={"help": "Regex (full match) of the module names to adapt; default: the language model's linears."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise InvalidSettings(f"r must be a positive integer, not {self.r!r}")
        if not self.alpha > 0:
            raise InvalidSettings(f"alpha must be positive, not {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise InvalidSettings(f"dropout must be in [0, 1), not {self.dropout!r}")
        try:
            re.compile(self.target_modules)
        except re.error as exc:
            raise InvalidSettings(f"target_modules is not a valid regex: {exc}") from None


def targeted_modules(model: Any, pattern: str) -> list[str]:
    """Names of the linear layers of `model` that `pattern` selects, as PEFT will match them."""
    import torch

    regex = re.compile(pattern)
    return [
        name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and regex.fullmatch(name)
    ]


def attach_lora(model: Any, settings: LoraSettings) -> PeftModel:
    """Wrap `model` (modified in place) with fresh LoRA layers on the language model; ready to train."""
    from peft import LoraConfig, get_peft_model

    if not targeted_modules(model, settings.target_modules):
        raise ModelError(f"No linear layer of this {type(model).__name__} matches {settings.target_modules!r}.")
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
    )
    return get_peft_model(model, config, revision=getattr(model, MODEL_REF_ATTRIBUTE, None))


def save_adapter(model: PeftModel, folder: Path) -> str:
    """Write the standard PEFT folder; returns the SHA-256 of adapter_model.safetensors (the adapter_ref)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    return adapter_sha256(folder)


def adapter_sha256(folder: Path) -> str:
    """SHA-256 (hex) of the adapter weights file: what answers name as their adapter_ref."""
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise NotFound(f"No {ADAPTER_WEIGHTS} in {folder}; an adapter folder holds {ADAPTER_CONFIG} and it.")
    return file_sha256(weights)


def load_adapter(loaded: LoadedModel, folder: Path) -> LoadedModel:
    """Put the adapter in `folder` on the freshly loaded base `loaded` (modified in place) after checking it fits."""
    from peft import PeftModel

    config = read_adapter_config(folder)
    adapter_ref = adapter_sha256(folder)
    check_adapter_fits(loaded, folder, config)
    try:
        model = PeftModel.from_pretrained(loaded.model, str(folder), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise AdapterMismatch(f"The adapter in {folder} does not load onto {loaded.model_ref}: {exc}") from None
    return dataclasses.replace(loaded, model=model.eval(), adapter_ref=adapter_ref)


def merge_adapter(model: PeftModel) -> PreTrainedModel:
    """Fold the LoRA update into the base weights and drop the wrapper: same outputs, no adapter overhead."""
    merged: PreTrainedModel = model.merge_and_unload()
    return merged


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter's adapter_config.json, refused unless it is a LoRA adapter."""
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        raise NotFound(f"No {ADAPTER_CONFIG} in {folder}; is this a PEFT adapter folder?")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise AdapterMismatch(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterMismatch(f"The adapter in {folder} is not a LoRA adapter (peft_type must be 'LORA').")
    return config


def check_adapter_fits(loaded: LoadedModel, folder: Path, config: dict[str, Any]) -> None:
    """Refuse an adapter made for other base weights, or whose modules or shapes the base does not have."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(module, BaseTunerLayer) for module in loaded.model.modules()):
        raise AdapterMismatch(f"{loaded.model_ref} already carries an adapter; load a fresh base for {folder}.")
    base_ref = config.get("revision")
    if base_ref and _ref_hash(base_ref) != _ref_hash(loaded.model_ref):
        raise AdapterMismatch(
            f"The adapter in {folder} was trained on base {base_ref}, but the loaded base is {loaded.model_ref}."
        )
    lora, saved = _adapter_tensors(folder / ADAPTER_WEIGHTS)
    for module_name, part, shape in lora:
        _check_module_shape(loaded, folder, module_name, part, shape)
    _check_saved_modules(loaded, folder, saved, tuple(config.get("modules_to_save") or ()))


def _check_saved_modules(
    loaded: LoadedModel, folder: Path, saved: dict[str, tuple[int, ...]], modules_to_save: tuple[str, ...]
) -> None:
    """Whole modules trained beside the LoRA (PEFT's modules_to_save, e.g. the vision tower and projector):
    each tensor must belong to a listed module and match the base's parameter of the same name and shape."""
    parameters = {name: tuple(p.shape) for name, p in loaded.model.named_parameters()}
    for name, shape in saved.items():
        if not any(f".{module}." in f".{name}" for module in modules_to_save):
            raise AdapterMismatch(f"The adapter in {folder} holds {name}, neither a LoRA matrix nor a module to save.")
        if parameters.get(name) != shape:
            found = f"has with shape {list(parameters[name])}" if name in parameters else "does not have"
            raise AdapterMismatch(
                f"The adapter in {folder} replaces {name} with shape {list(shape)}, which {loaded.model_ref} {found}."
            )


def _check_module_shape(loaded: LoadedModel, folder: Path, name: str, part: str, shape: tuple[int, ...]) -> None:
    import torch

    module = dict(loaded.model.named_modules()).get(name)
    if not isinstance(module, torch.nn.Linear):
        raise AdapterMismatch(f"The adapter in {folder} targets {name}, which {loaded.model_ref} does not have.")
    expected = module.in_features if part == "A" else module.out_features
    actual = shape[1] if part == "A" else shape[0]
    if len(shape) != 2 or actual != expected:
        raise AdapterMismatch(
            f"The adapter in {folder} has lora_{part} of shape {list(shape)} for {name}, "
            f"which is {module.in_features}->{module.out_features} in {loaded.model_ref}."
        )


def _adapter_tensors(
    weights: Path,
) -> tuple[list[tuple[str, str, tuple[int, ...]]], dict[str, tuple[int, ...]]]:
    """From the file's header only: (module, "A" or "B", shape) per LoRA matrix, and the other tensors (whole
    modules saved beside the LoRA) by their name in the base model."""
    from safetensors import safe_open

    lora: list[tuple[str, str, tuple[int, ...]]] = []
    saved: dict[str, tuple[int, ...]] = {}
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
            shape = tuple(handle.get_slice(key).get_shape())
            match = _LORA_KEY.match(key)
            if match is not None:
                lora.append((match["module"], match["part"], shape))
            else:
                saved[key.removeprefix("base_model.model.")] = shape
    if not lora:
        raise AdapterMismatch(f"{weights} holds no LoRA weights.")
    return lora, saved


def _ref_hash(model_ref: str) -> str:
    """The weights part of "<folder>@<sha12>": a renamed copy of the same weights is the same base."""
    return model_ref.rpartition("@")[2]
