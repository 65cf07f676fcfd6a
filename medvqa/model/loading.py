"""Load an image-text-to-text checkpoint and its processor from a local folder, and name it by content.

Only local folders with safetensors weights are accepted: no network (`local_files_only=True`), no pickled
weights, no remote code. The model is named `"<folder>@<sha12>"` where sha12 starts the SHA-256 of its weight
files, so every answer can say exactly which weights produced it. torch/transformers are imported lazily.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvqa.errors import InvalidInput, ModelError, NotFound

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")
REF_HASH_CHARS = 12
MODEL_REF_ATTRIBUTE = "medvqa_model_ref"  # stamped on the loaded model, so adapters trained on it can record it
_CHUNK = 1 << 20


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to answer: weights in eval mode, its processor, and where and how it runs."""

    model: Any  # transformers PreTrainedModel (AutoModelForImageTextToText) or a PeftModel around one, eval mode
    processor: Any  # the checkpoint's AutoProcessor
    model_ref: str  # "<folder name>@<first 12 hex of weights_sha256>": the base weights, whatever adapter is on
    device: str  # "cpu" or "cuda:N"
    dtype: str  # one of DTYPES
    adapter_ref: str | None = None  # SHA-256 of the adapter weights when `load_adapter` put one on


def weights_sha256(path: Path) -> str:
    """SHA-256 (hex) over the folder's *.safetensors files, sorted by name, streamed so large shards fit."""
    files = sorted(path.glob("*.safetensors"), key=lambda file: file.name)
    if not files:
        raise ModelError(f"No *.safetensors weight files in {path}; convert the checkpoint to safetensors.")
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def resolve_device(device: str) -> tuple[str, torch.dtype]:
    """The device to run on and its natural dtype: "auto" picks cuda:0 with bfloat16 when a GPU is present."""
    import torch

    name = device.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu", torch.float32
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        index = int(name[5:]) if ":" in name else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise InvalidInput(f"Device {device!r} was asked for, but no such CUDA GPU is available; use 'cpu'.")
        return f"cuda:{index}", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    raise InvalidInput(f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'.")


def _resolve_dtype(dtype: str, natural: torch.dtype) -> torch.dtype:
    """`dtype` as a torch dtype; "auto" keeps the device's natural one."""
    import torch

    if dtype == "auto":
        return natural
    if dtype not in DTYPES:
        raise InvalidInput(f"Unknown dtype {dtype!r}; use 'auto' or one of {', '.join(DTYPES)}.")
    resolved: torch.dtype = getattr(torch, dtype)
    return resolved


def check_checkpoint(path: Path) -> str:
    """Refuse anything that is not a supported image-text-to-text checkpoint folder; returns its model type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if not path.is_dir():
        raise NotFound(f"No model folder at {path}; point the model setting at a local checkpoint folder.")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{path} is not a Hugging Face checkpoint: it has no config.json.")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as exc:
        raise ModelError(f"{config_file} is not valid JSON: {_one_line(exc)}") from None
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ModelError(
            f"{path} holds a {model_type!r} model, which is not an image-text-to-text architecture; "
            "use a vision-language checkpoint such as LLaVA, Idefics3/SmolVLM, Qwen2-VL or PaliGemma."
        )
    return str(model_type)


def load_vlm(path: Path, device: str = "auto", dtype: str = "auto", *, quantize_4bit: bool = False) -> LoadedModel:
    """Load model + processor from the local folder `path`, in eval mode, on `device` with `dtype`.

    `quantize_4bit` (QLoRA's base) stores the language model's linear weights in 4-bit NF4 with bitsandbytes,
    computing in `dtype`; the vision tower, projector and output head stay in `dtype`. The model_ref is the
    checkpoint's: an adapter trained on the 4-bit base is an ordinary LoRA adapter of the same checkpoint.
    """
    path = Path(path).expanduser()
    model_type = check_checkpoint(path)
    device_name, natural = resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, natural)
    model_ref = f"{path.resolve().name}@{weights_sha256(path)[:REF_HASH_CHARS]}"
    processor = _load_processor(path, model_type)
    if quantize_4bit:
        model = _load_model(path, torch_dtype, _four_bit(torch_dtype), device_name).eval()
    else:
        model = _load_model(path, torch_dtype).to(device_name).eval()
    setattr(model, MODEL_REF_ATTRIBUTE, model_ref)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    return LoadedModel(model=model, processor=processor, model_ref=model_ref, device=device_name, dtype=dtype_name)


def _load_processor(path: Path, model_type: str) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(  # type: ignore[no-untyped-call]
            path, local_files_only=True, trust_remote_code=False
        )
    except ImportError as exc:
        if "torchvision" in str(exc).lower():
            raise ModelError(
                f"The {model_type!r} processor in {path} needs the torchvision package in this transformers "
                "version; install torchvision (matching the installed torch) to use this model."
            ) from None
        raise ModelError(f"Cannot load the processor from {path}: {_one_line(exc)}") from None
    except Exception as exc:  # as for the weights: any failure means the processor files are unusable
        raise ModelError(f"Cannot load the processor from {path}: {_one_line(exc)}") from exc


# Modules QLoRA keeps in full precision, by the names the supported families use (transformers 5).
UNQUANTIZED_MODULES = ["vision_tower", "vision_model", "visual", "multi_modal_projector", "connector", "lm_head"]


def _four_bit(compute_dtype: torch.dtype) -> Any:
    """QLoRA's quantisation (NF4, double quantisation), or a one-line error when bitsandbytes is missing."""
    import importlib.util

    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("4-bit loading (QLoRA) needs the bitsandbytes package: pip install 'medvqa[qlora]'.")
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=[f".*{name}" for name in UNQUANTIZED_MODULES],  # at any depth (transformers 5 regex)
    )


def _load_model(path: Path, torch_dtype: torch.dtype, quantization: Any = None, device: str | None = None) -> Any:
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # a per-load bar is CLI noise
    placement = {"quantization_config": quantization, "device_map": {"": device}} if quantization else {}
    try:
        return AutoModelForImageTextToText.from_pretrained(
            path, local_files_only=True, dtype=torch_dtype, use_safetensors=True, trust_remote_code=False, **placement
        )
    except Exception as exc:  # a broken or foreign file can fail in many ways; all mean "this checkpoint is unusable"
        raise ModelError(f"Cannot load the model weights from {path}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    """The first non-blank line of an exception message, bounded: for messages, not tracebacks."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
