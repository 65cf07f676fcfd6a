"""The embedded default VLM: a standard LLaVA whose language model is SmolLM2-135M-Instruct.

The vision tower and projector are small and randomly initialised here; our own pipeline trains them on
VQA-RAD training images. Being a plain `LlavaForConditionalGeneration` saved with its `LlavaProcessor`, the
result loads like any other checkpoint the model contract names (`AutoProcessor` +
`AutoModelForImageTextToText`, offline), and LoRA adapters trained on it are ordinary PEFT folders.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from medvqa.errors import InvalidInput, ModelBuildError
from medvqa.model.default_processor import ANSWER_END, add_vlm_tokens, build_processor
from medvqa.model.smollm2 import SOURCE_RECORD, convert_smollm2
from medvqa.model.staging import write_folder_atomically

if TYPE_CHECKING:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, PreTrainedModel, PreTrainedTokenizerBase

BUILD_RECORD = "medvqa_default_model.json"
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "chat_template.jinja",
    BUILD_RECORD,
)
# Mean and spread of VQA-RAD training images (grey radiographs stored as RGB) after scaling to [0, 1].
RADIOGRAPH_MEAN = (0.31, 0.31, 0.31)
RADIOGRAPH_STD = (0.24, 0.24, 0.24)


@dataclass(frozen=True)
class DefaultModelConfig:
    """The shape of the default VLM's vision side. Saved next to the weights, in `medvqa_default_model.json`."""

    # 128 px gives 64 image tokens: one LoRA epoch over VQA-RAD train costs ~31 min on a 2-core CPU, against
    # ~53 min at 192 px (144 tokens) and ~73 min at 224 px. Raise it where a GPU trains the model.
    image_size: int = field(default=128, metadata={"help": "Side in pixels every image is resized to (square)."})
    patch_size: int = field(default=16, metadata={"help": "Side of a ViT patch; (image_size/patch_size)^2 patches."})
    vision_tower: Literal["clip", "siglip"] = field(
        default="clip", metadata={"help": "CLIP ViT (has a class token) or SigLIP ViT (patches only)."}
    )
    vision_hidden_size: int = field(default=256, metadata={"help": "Width of the vision transformer."})
    vision_layers: int = field(default=4, metadata={"help": "Number of vision transformer layers."})
    vision_heads: int = field(default=4, metadata={"help": "Attention heads per vision layer; divides the width."})
    vision_intermediate_size: int = field(default=1024, metadata={"help": "Width of each vision MLP."})
    projector_type: str = field(
        default="mlp2x_gelu", metadata={"help": "Vision-to-text projector; LLaVA's Linear-GELU-Linear is the one."}
    )
    vision_feature_select_strategy: Literal["default", "full"] = field(
        default="default",
        metadata={"help": "'default' drops CLIP's class token from the image features, 'full' keeps every token."},
    )
    image_mean: tuple[float, float, float] = field(
        default=RADIOGRAPH_MEAN, metadata={"help": "Per-channel mean subtracted after scaling pixels to [0, 1]."}
    )
    image_std: tuple[float, float, float] = field(
        default=RADIOGRAPH_STD, metadata={"help": "Per-channel spread the centred pixels are divided by."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random vision tower and projector."})

    def __post_init__(self) -> None:
        self._check_shapes()
        if self.vision_tower not in ("clip", "siglip"):
            raise InvalidInput(f"vision_tower must be 'clip' or 'siglip', not {self.vision_tower!r}.")
        if self.projector_type != "mlp2x_gelu":
            raise InvalidInput(f"projector_type {self.projector_type!r} is not supported; use 'mlp2x_gelu'.")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise InvalidInput("vision_feature_select_strategy must be 'default' or 'full'.")
        if self.vision_tower == "siglip" and self.vision_feature_select_strategy == "default":
            raise InvalidInput("SigLIP has no class token to drop: use vision_feature_select_strategy='full'.")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise InvalidInput("image_mean and image_std need 3 values each, and every std must be positive.")
        if self.seed < 0:
            raise InvalidInput(f"seed must be zero or positive, not {self.seed}.")

    def _check_shapes(self) -> None:
        sizes = (self.image_size, self.patch_size, self.vision_hidden_size, self.vision_layers, self.vision_heads)
        if min(*sizes, self.vision_intermediate_size) <= 0:
            raise InvalidInput("image, patch and vision sizes must all be positive.")
        if self.image_size % self.patch_size:
            raise InvalidInput(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}.")
        if self.vision_hidden_size % self.vision_heads:
            raise InvalidInput(f"vision_hidden_size {self.vision_hidden_size} is not divisible by vision_heads.")

    @property
    def num_additional_image_tokens(self) -> int:
        """Tokens the vision tower adds to the patches: CLIP's class token, none for SigLIP."""
        return 1 if self.vision_tower == "clip" else 0

    @property
    def image_token_count(self) -> int:
        """`<image>` tokens per image in the prompt; must equal the features the vision tower hands over."""
        count = (self.image_size // self.patch_size) ** 2 + self.num_additional_image_tokens
        return count - 1 if self.vision_feature_select_strategy == "default" else count

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "image_mean": list(self.image_mean), "image_std": list(self.image_std)}


def default_model_dir(home: Path) -> Path:
    """Where the default model lives under MEDVQA_HOME."""
    return home / "models" / "medvqa-default"


def smollm2_dir(home: Path) -> Path:
    """Where the converted SmolLM2 checkpoint is cached under MEDVQA_HOME."""
    return home / "models" / "smollm2-135m-instruct"


def is_complete_model(folder: Path) -> bool:
    """Whether `folder` holds every file a finished build writes (the build record is written last)."""
    return all((folder / name).is_file() for name in MODEL_FILES)


def ensure_base_model(home: Path, config: DefaultModelConfig | None = None) -> Path:
    """The untrained default model under `home`, converting SmolLM2 and building it first if absent."""
    target, config = default_model_dir(home), config or DefaultModelConfig()
    if _already_built(target, config):
        return target
    text_checkpoint = convert_smollm2(smollm2_dir(home))
    return build_default_model(text_checkpoint, target, config)


def build_default_model(text_checkpoint: Path, target: Path, config: DefaultModelConfig) -> Path:
    """Build the default VLM from a converted SmolLM2 checkpoint and save it (model + processor) at `target`.

    Idempotent: a complete model already at `target` built with the same config is returned as is; one built
    with another config is refused rather than silently reused. Written atomically (see `staging`).
    """
    if _already_built(target, config):
        return target
    return write_folder_atomically(
        target, lambda staging: _write_model(text_checkpoint, staging, config), is_complete_model
    )


def _already_built(target: Path, config: DefaultModelConfig) -> bool:
    """True when `target` holds a finished build of `config`; raises when it holds a build of another config."""
    if not is_complete_model(target):
        return False
    built = json.loads((target / BUILD_RECORD).read_text(encoding="utf-8"))["config"]
    if built != config.to_json():
        raise ModelBuildError(
            f"{target} holds a default model built with other settings (an adapter trained on it would not fit "
            "a new build); move it away to build again."
        )
    return True


def _write_model(text_checkpoint: Path, folder: Path, config: DefaultModelConfig) -> None:
    """Assemble the LLaVA model and processor and save them, then the build record, into `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_checkpoint, local_files_only=True)
    text_model = AutoModelForCausalLM.from_pretrained(text_checkpoint, dtype=torch.float32, local_files_only=True)
    model = build_llava_model(text_model, tokenizer, config)
    model.save_pretrained(folder)
    processor = build_processor(
        tokenizer,
        image_size=config.image_size,
        patch_size=config.patch_size,
        image_mean=config.image_mean,
        image_std=config.image_std,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=config.num_additional_image_tokens,
    )
    processor.save_pretrained(folder)
    _write_build_record(text_checkpoint, folder, config)


def build_llava_model(
    text_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: DefaultModelConfig
) -> LlavaForConditionalGeneration:
    """The default VLM in memory: SmolLM2's weights, a vision tower and projector drawn from `config.seed`.

    Adds the `<image>` and pad tokens to `tokenizer` (in place) and grows the embeddings to match. The global
    torch RNG is left as it was, so building a model does not change a caller's random stream.
    """
    import torch

    image_token_id = add_vlm_tokens(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = _assemble(text_model, build_llava_config(text_model, config, image_token_id))
        model.resize_token_embeddings(len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(ANSWER_END)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    return model


def build_llava_config(text_model: PreTrainedModel, config: DefaultModelConfig, image_token_id: int) -> LlavaConfig:
    """The LlavaConfig: SmolLM2's own text config, a small vision config, and the `<image>` token's id."""
    from transformers import CLIPVisionConfig, LlavaConfig, SiglipVisionConfig

    vision_class = CLIPVisionConfig if config.vision_tower == "clip" else SiglipVisionConfig
    vision_config = vision_class(
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_size=config.vision_hidden_size,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        intermediate_size=config.vision_intermediate_size,
        num_channels=3,
    )
    if config.vision_tower == "siglip":
        vision_config.vision_use_head = False  # LLaVA reads hidden states; the pooling head would be dead weight
    return LlavaConfig(
        vision_config=vision_config,
        text_config=copy.deepcopy(text_model.config),
        image_token_index=image_token_id,
        image_seq_length=config.image_token_count,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        tie_word_embeddings=bool(text_model.config.tie_word_embeddings),
    )


def _assemble(text_model: PreTrainedModel, llava_config: LlavaConfig) -> LlavaForConditionalGeneration:
    """A random LLaVA with every SmolLM2 tensor copied into its language model and head (strictly)."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(llava_config)
    body = model.model.language_model.load_state_dict(text_model.model.state_dict(), strict=False)
    head = model.lm_head.load_state_dict(text_model.lm_head.state_dict(), strict=False)
    problems = [*body.missing_keys, *body.unexpected_keys, *head.missing_keys, *head.unexpected_keys]
    if problems:
        raise ModelBuildError(
            f"SmolLM2 weights do not fit the LLaVA language model ({problems[:5]}); delete the converted "
            "checkpoint so it is converted again with this transformers version."
        )
    return model


def _write_build_record(text_checkpoint: Path, folder: Path, config: DefaultModelConfig) -> None:
    source_file = text_checkpoint / SOURCE_RECORD
    source = json.loads(source_file.read_text(encoding="utf-8")) if source_file.is_file() else None
    record = {"config": config.to_json(), "image_token_count": config.image_token_count, "text_source": source}
    (folder / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
