"""Tiny random-init vision-language checkpoints, one per model family, built offline in seconds.

Each builder writes a folder that `AutoProcessor` / `AutoModelForImageTextToText` load with
`local_files_only=True`: a byte-level BPE tokenizer trained in memory, a PIL image processor (no
torchvision), a chat template, and a model whose image-token count matches its vision config.
The sizes are the smallest that keep every family's shape rules (head dims, rope sections) valid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = ("llava", "idefics3", "qwen2_vl", "paligemma", "gemma3")
SAMPLE_IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa-rad" / "images" / "synpic100132.jpg"
_CORPUS = [
    "yes no Yes No YES NO. " * 8,
    "Is there a fracture in the left femur? yes, no.",
    "What organ is shown in the image? The liver. The lungs are clear.",
    "Answer the question about the medical image briefly. Are the kidneys normal?",
]
# llava-hf/llava-1.5 template as published: a system turn is rendered without a role prefix.
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Gemma 3 / MedGemma template, shortened: the system turn is folded into the first user turn by the template.
_GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{{ '<start_of_turn>' + message['role'] + '\\n' }}"
    "{% if loop.first %}{{ first_user_prefix }}{% endif %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}{% elif item['type'] == 'text' %}{{ item['text'] | trim }}"
    "{% endif %}{% endfor %}{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ image_slot }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The SmolVLM / Idefics3 template as published: it requires list contents and renders every role.
_IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tokenizer(special_tokens: list[str], **named: Any) -> Any:
    """A byte-level BPE tokenizer trained on a few sentences: encodes any text, knows `special_tokens`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, **named)


# The smallest sizes that keep each family's shape rules valid (head dims, rope sections, pooling).
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
TEXT |= {"num_key_value_heads": 1, "max_position_embeddings": 512}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
VISION |= {"image_size": 28, "patch_size": 14}


def _special_ids(tok: Any) -> dict[str, Any]:
    return {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}


def _build_llava() -> tuple[Any, Any]:
    """LLaVA-1.5 shape: CLIP tower with a class token, 'default' strategy drops it: (28/14)^2 = 4 image tokens."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    names = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
    tok = build_tokenizer([*names.values(), "<image>"], **names, extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token
        chat_template=_LLAVA_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=LlamaConfig(vocab_size=len(tok), **TEXT, **_special_ids(tok)),
        image_token_id=tok.image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(config), processor


def _build_idefics3() -> tuple[Any, Any]:
    """SmolVLM shape: 56 px tiles of 14 px patches, pixel shuffle by 2: (56/14)^2 / 2^2 = 4 tokens per tile."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tiles = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
    names = {"pad_token": "<pad>", "bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>"}
    marks = ["<image>", "<fake_token_around_image>", "<global-img>"]
    tok = build_tokenizer([*names.values(), *marks, *tiles], **names)
    # A 112 px image is split into 2x2 tiles of 56 px plus a global view: 5 x 4 image tokens.
    images = Idefics3ImageProcessorPil(
        do_image_splitting=True, size={"longest_edge": 112}, max_image_size={"longest_edge": 56}
    )
    processor = Idefics3Processor(
        image_processor=images, tokenizer=tok, image_seq_len=4, chat_template=_IDEFICS3_TEMPLATE
    )
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**(VISION | {"image_size": 56})),
        text_config=LlamaConfig(vocab_size=len(tok), **TEXT, **_special_ids(tok)),
        scale_factor=2,
        image_token_id=processor.image_token_id,
    )
    return Idefics3ForConditionalGeneration(config), processor


class ProcessorFiles:
    """A processor's files written one by one, for classes that cannot be built here (see `_build_qwen2_vl`)."""

    def __init__(self, processor_class: str, tokenizer: Any, image_processor: Any, chat_template: str) -> None:
        self.processor_class = processor_class
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.tokenizer.chat_template = chat_template

    def save_pretrained(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        (folder / "processor_config.json").write_text(json.dumps({"processor_class": self.processor_class}))


def _build_qwen2_vl() -> tuple[Any, Any]:
    """Qwen2-VL shape: images resized to 56x56 pixels in all (aspect kept), 14 px patches merged 2x2.

    `Qwen2VLProcessor` also holds a video processor, which needs torchvision in transformers 5; without it the
    processor cannot even be constructed, so its files are written directly: `load_vlm` then loads it wherever
    torchvision is installed and explains the missing package elsewhere.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    marks = ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = build_tokenizer(["<|endoftext|>", "<|im_end|>", *marks], pad_token="<|endoftext|>", eos_token="<|im_end|>")
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2)
    template = _CHATML.replace("{{ image_slot }}", "<|vision_start|><|image_pad|><|vision_end|>")
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # sums to head_dim / 2
    vision = {"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14}
    ids = tok.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vision_config=vision | {"spatial_merge_size": 2, "temporal_patch_size": 2},
        text_config={"vocab_size": len(tok), **TEXT, "rope_parameters": rope, **_special_ids(tok)},
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    processor = ProcessorFiles("Qwen2VLProcessor", tok, images, template)
    return Qwen2VLForConditionalGeneration(config), processor


def _build_paligemma() -> tuple[Any, Any]:
    """PaliGemma shape: SigLIP without a class token, (28/14)^2 = 4 image tokens, and no chat template (as shipped)."""
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    names = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}
    tok = build_tokenizer([*names.values(), "<image>"], **names)
    images = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    images.image_seq_length = 4  # read by PaliGemmaProcessor, saved in preprocessor_config.json as real ones are
    processor = PaliGemmaProcessor(image_processor=images, tokenizer=tok)  # adds 1,152 <loc>/<seg> tokens
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**VISION, vision_use_head=False),
        text_config=GemmaConfig(vocab_size=len(tok), **TEXT, head_dim=16, **_special_ids(tok)),
        image_token_index=processor.image_token_id,
        projection_dim=32,
        hidden_size=32,
        vocab_size=len(tok),
    )
    return PaliGemmaForConditionalGeneration(config), processor


def _build_gemma3() -> tuple[Any, Any]:
    """Gemma 3 / MedGemma shape: SigLIP 28 px / 14 px = 2x2 patches pooled to mm_tokens_per_image = 4 tokens."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, SiglipVisionConfig
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    names = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}
    marks = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    specials = [*names.values(), "<start_of_turn>", "<end_of_turn>", *marks.values()]
    tok = build_tokenizer(specials, **names, extra_special_tokens=marks)
    images = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    processor = Gemma3Processor(
        image_processor=images, tokenizer=tok, image_seq_length=4, chat_template=_GEMMA3_TEMPLATE
    )
    attention = {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64}
    ids = tok.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=Gemma3TextConfig(vocab_size=len(tok), **TEXT, **attention, **_special_ids(tok)),
        vision_config=SiglipVisionConfig(**VISION),
        mm_tokens_per_image=4,
        image_token_index=ids(marks["image_token"]),
        boi_token_index=ids(marks["boi_token"]),
        eoi_token_index=ids(marks["eoi_token"]),
    )
    return Gemma3ForConditionalGeneration(config), processor


BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "llava": _build_llava,
    "idefics3": _build_idefics3,
    "qwen2_vl": _build_qwen2_vl,
    "paligemma": _build_paligemma,
    "gemma3": _build_gemma3,
}


def build_tiny_vlm(family: str, folder: Path, seed: int = 0) -> Path:
    """Write a tiny random-init checkpoint of `family` (model + processor) into `folder` and return it."""
    import torch

    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    model, processor = BUILDERS[family]()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def torch_single_thread() -> Iterator[None]:
    """Run tiny models on one thread: on a busy 2-core machine OpenMP's spinning makes them ~100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_BUILT: dict[str, Path] = {}  # family -> folder, shared by every test module of the run


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Build each family's checkpoint at most once per test run; returns `family -> folder` (read-only use)."""

    def get(family: str) -> Path:
        if family not in _BUILT:
            _BUILT[family] = build_tiny_vlm(family, tmp_path_factory.mktemp(f"vlm-{family}"))
        return _BUILT[family]

    return get


@pytest.fixture(scope="session")
def sample_image() -> Any:
    """A real VQA-RAD radiograph, as the model would receive it."""
    from PIL import Image

    if not SAMPLE_IMAGE.is_file():
        pytest.skip(f"VQA-RAD sample image missing at {SAMPLE_IMAGE}")
    with Image.open(SAMPLE_IMAGE) as image:
        return image.convert("RGB")
