"""The processor of the default VLM: SmolLM2's tokenizer plus an `<image>` token, a plain resizing image
processor (no torchvision), and a ChatML chat template that puts the image before the question.

How a training target is appended (the contract the training code relies on):
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)   # ends "<|im_start|>assistant\\n"
    text   = prompt + answer.strip() + ANSWER_END                                   # ANSWER_END = "<|im_end|>"
Tokenize `text` once (with the image) and mask the labels of the first len(prompt tokens) positions with -100.
The generation prompt ends in a newline, which SmolLM2's byte-level BPE never merges with a following letter,
digit or word, so the prompt tokens are an exact prefix of the tokens of `text` and no answer token is masked
(`tests/test_default_model.py` checks this). Do not start the answer with a space: " no" is a different token
("Ġno") from the "no" the model produces after the newline. The pad token is `<|endoftext|>`, not `<|im_end|>`,
so masking padding by id never masks the `<|im_end|>` that teaches the model to stop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlavaProcessor, PreTrainedTokenizerBase

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<|endoftext|>"
ANSWER_END = "<|im_end|>"
GENERATION_PROMPT = "<|im_start|>assistant\n"

# ChatML as SmolLM2 was tuned on it. A message's content is a string or a list of parts; image parts come
# first (one <image> each, then a newline), then the text parts joined by newlines. No default system prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list -%}"
    "{%- for item in images -%}{{- '<image>' -}}{%- endfor -%}"
    "{%- if images -%}{{- '\\n' -}}{%- endif -%}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') -}}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def add_vlm_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add the `<image>` special token and make `<|endoftext|>` the pad token; return the image token's id."""
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.chat_template = CHAT_TEMPLATE
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if not isinstance(image_token_id, int):  # one token in gives one id out; this narrows the type
        raise TypeError(f"expected one id for {IMAGE_TOKEN}, got {image_token_id!r}")
    return image_token_id


def build_processor(
    tokenizer: PreTrainedTokenizerBase,
    *,
    image_size: int,
    patch_size: int,
    image_mean: tuple[float, float, float],
    image_std: tuple[float, float, float],
    vision_feature_select_strategy: str,
    num_additional_image_tokens: int,
) -> LlavaProcessor:
    """A LlavaProcessor whose image processor squashes each image to image_size x image_size.

    Resizing without a centre crop keeps the whole radiograph: a lesion at the edge must not be cut away.
    The aspect change is mild for VQA-RAD (most images are 0.7-1.3 wide per high).
    """
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=False,
        image_mean=list(image_mean),
        image_std=list(image_std),
    )
    return LlavaProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=num_additional_image_tokens,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
