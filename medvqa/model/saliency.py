"""Where the model looked: a heatmap over the image of what drove an answer, and the sanity checks that say
whether such a map can be trusted for this model.

Method: the gradient of the answer's log-probability (the sum over its tokens, teacher-forced after the prompt)
with respect to the image tokens the language model reads (the output of the model's projector, `multi_modal_
projector` in LLaVA, Gemma 3 and PaliGemma, `connector` in Idefics3/SmolVLM), its L2 norm per image token, laid
out on the token grid (the last image tile: the whole picture for tiled processors such as Idefics3's) and
stretched over the exact image the model saw. medvqa's model inputs are square (padded, never cropped), and the
processors of these families only resize a square, so the token grid covers the image edge to edge.

Trust (Adebayo et al., 2018, "Sanity checks for saliency maps"): a map must change when the model's weights
are randomised (here the image pathway, projector and image encoder, re-drawn at random and restored) and must
differ between two different images asked the same question. `sanity_check` runs both on two fixed synthetic
images; the workbench shows no map for a model that passes neither.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medvqa.errors import ModelError
from medvqa.model.generation import build_inputs
from medvqa.model.prompts import DEFAULT_PROMPT_VERSION, load_prompt

if TYPE_CHECKING:
    from PIL.Image import Image

    from medvqa.model.loading import LoadedModel

METHOD = "grad-norm@image-tokens/v1"
PROJECTOR_NAMES = ("multi_modal_projector", "connector")
VISION_NAMES = ("vision_tower", "vision_model", "visual")  # the image encoder, below the projector
# A map "changed" when its rank correlation with the other map is below this (Adebayo et al. report
# similarity metrics; a method that survives randomisation keeps a high rank correlation).
CHANGED_BELOW = 0.8
CHECK_QUESTION = "Is there an abnormality in this image?"


@dataclass(frozen=True)
class SaliencyMap:
    """Per image token, how strongly the answer depends on it, on the token grid, scaled to [0, 1]."""

    grid: np.ndarray  # (rows, cols) float32
    method: str = METHOD

    def sha256(self) -> str:
        """The map's identity, for the answer's provenance: method, shape and values (float32, C order)."""
        digest = hashlib.sha256(f"{self.method}|{self.grid.shape}".encode())
        digest.update(np.ascontiguousarray(self.grid, dtype=np.float32).tobytes())
        return digest.hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "grid": [[round(float(v), 6) for v in row] for row in self.grid]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SaliencyMap:
        return cls(np.asarray(data["grid"], dtype=np.float32), str(data["method"]))

    def pixels(self, width: int, height: int) -> np.ndarray:
        """The map stretched over an image of this size (bilinear), values in [0, 1]."""
        from PIL import Image as PILImage

        scaled = PILImage.fromarray((self.grid * 255).astype(np.uint8), mode="L").resize(
            (width, height), PILImage.Resampling.BILINEAR
        )
        return np.asarray(scaled, dtype=np.float32) / 255.0

    def overlay(self, image: Image, opacity: float = 0.5) -> Image:
        """The image with the map laid over it (a perceptual colour map: matplotlib's inferno)."""
        from matplotlib import colormaps
        from PIL import Image as PILImage

        if not 0.0 <= opacity <= 1.0:
            raise ValueError(f"opacity must be between 0 and 1, not {opacity}")
        base = image.convert("RGB")
        heat = colormaps["inferno"](self.pixels(*base.size))[..., :3]
        blended = (1 - opacity) * np.asarray(base, dtype=np.float32) / 255.0 + opacity * heat
        return PILImage.fromarray((np.clip(blended, 0, 1) * 255).astype(np.uint8))


def supports_saliency(loaded: LoadedModel) -> bool:
    """Whether the model has a projector whose output the map is taken at (the in-process backend only)."""
    return _projector(loaded.model) is not None


def _projector(model: Any) -> Any:
    return _module(model, PROJECTOR_NAMES)


def _module(model: Any, names: Sequence[str]) -> Any:
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in names:
            return module
    return None


def _extended(inputs: Any, answer_ids: Sequence[int], model_type: str) -> dict[str, Any]:
    """The prompt's inputs with the answer's tokens appended (teacher forcing)."""
    import torch

    prompt_length = int(inputs["input_ids"].shape[1])
    device = inputs["input_ids"].device
    extra = torch.tensor([list(answer_ids)], dtype=inputs["input_ids"].dtype, device=device)
    batch = dict(inputs)
    batch["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    if "attention_mask" in batch:
        batch["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
    if "token_type_ids" in batch:  # PaliGemma: 1 marks the suffix (the answer); Gemma 3: 1 marks image tokens
        fill = torch.ones_like(extra) if model_type == "paligemma" else torch.zeros_like(extra)
        batch["token_type_ids"] = torch.cat([inputs["token_type_ids"], fill], dim=1)
    batch["_prompt_length"] = prompt_length
    return batch


def saliency(
    loaded: LoadedModel,
    image: Image,
    question: str,
    answer_ids: Sequence[int],
    prompt_version: str = DEFAULT_PROMPT_VERSION,
) -> SaliencyMap:
    """The map for the answer `answer_ids` (the generated token ids, as `Answer.token_ids` holds them) to
    `question` about `image`."""
    import torch

    projector = _projector(loaded.model)
    if projector is None:
        raise ModelError("this model has no image projector to take a saliency map at (multi_modal_projector)")
    if not answer_ids:
        raise ModelError("the answer has no tokens to explain")
    inputs = build_inputs(loaded, load_prompt(prompt_version), image, question)
    batch = _extended(inputs, answer_ids, str(getattr(loaded.model.config, "model_type", "")))
    prompt_length = batch.pop("_prompt_length")
    captured: list[Any] = []

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        leaf = (output[0] if isinstance(output, tuple) else output).detach().requires_grad_(True)
        captured.append(leaf)
        return (leaf, *output[1:]) if isinstance(output, tuple) else leaf

    handle = projector.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = loaded.model(**batch).logits[0].float()
            targets = batch["input_ids"][0, prompt_length:]
            logprobs = torch.log_softmax(logits[prompt_length - 1 : -1], dim=-1)
            objective = logprobs.gather(1, targets.unsqueeze(1)).sum()
            (gradient,) = torch.autograd.grad(objective, captured[-1])
    finally:
        handle.remove()
    return SaliencyMap(_grid(gradient))


def _grid(gradient: Any) -> np.ndarray:
    """Gradient norms of the last image (tile) laid out on its square token grid, scaled to [0, 1]."""
    tokens = gradient.reshape(-1, gradient.shape[-2], gradient.shape[-1])[-1]  # (tokens, hidden)
    norms: np.ndarray = np.asarray(tokens.float().norm(dim=-1).cpu().numpy(), dtype=np.float32)
    side = math.isqrt(norms.size)
    if side * side != norms.size:
        raise ModelError(f"{norms.size} image tokens do not form a square grid; no saliency map for this model")
    grid: np.ndarray = norms.reshape(side, side)
    top = float(grid.max())
    return grid / np.float32(top) if top > 0 else grid


def rank_correlation(first: SaliencyMap, second: SaliencyMap) -> float:
    """Spearman's rank correlation of two maps on the same grid (1: the same ordering of image regions)."""
    from scipy.stats import spearmanr

    if first.grid.shape != second.grid.shape:
        raise ValueError("maps on different grids cannot be compared")
    a, b = first.grid.ravel(), second.grid.ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(spearmanr(a, b).statistic)


@dataclass(frozen=True)
class SanityCheck:
    """Adebayo et al.'s two checks on one model: correlations and whether each passed."""

    weights_randomised: float  # rank correlation, real weights vs a randomised projector
    other_image: float  # rank correlation, one image vs another, same question

    @property
    def passes_model_randomisation(self) -> bool:
        return self.weights_randomised < CHANGED_BELOW

    @property
    def passes_data_check(self) -> bool:
        return self.other_image < CHANGED_BELOW

    @property
    def trusted(self) -> bool:
        """A map that passes neither check is not shown."""
        return self.passes_model_randomisation or self.passes_data_check

    def to_json(self) -> dict[str, Any]:
        return {
            "weights_randomised_rank_correlation": round(self.weights_randomised, 4),
            "other_image_rank_correlation": round(self.other_image, 4),
            "passes_model_randomisation": self.passes_model_randomisation,
            "passes_data_check": self.passes_data_check,
            "changed_below": CHANGED_BELOW,
        }


def check_images(size: int = 384) -> tuple[Image, Image]:
    """Two fixed, different synthetic pictures: a bright disc top left, or bottom right, on the same noise."""
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    noise = rng.normal(60, 12, (size, size))
    rows, cols = np.mgrid[0:size, 0:size]
    pictures = []
    for cy, cx in ((0.3, 0.3), (0.7, 0.7)):
        disc = ((rows - cy * size) ** 2 + (cols - cx * size) ** 2) < (0.12 * size) ** 2
        pixels = np.clip(noise + 160 * disc, 0, 255).astype(np.uint8)
        pictures.append(PILImage.fromarray(pixels).convert("RGB"))
    return pictures[0], pictures[1]


def _greedy_ids(loaded: LoadedModel, image: Image, question: str) -> list[int]:
    from medvqa.model.generation import answer

    ids = list(answer(loaded, image, question).token_ids)
    return ids or [int(loaded.processor.tokenizer.eos_token_id or 0)]


def sanity_check(loaded: LoadedModel, seed: int = 0) -> SanityCheck:
    """Both checks on the two fixed images: the map of the first image with the model as it is and with its
    projector re-drawn at random (then restored exactly), and the maps of the two images."""
    import torch

    first, second = check_images()
    first_ids = _greedy_ids(loaded, first, CHECK_QUESTION)
    real = saliency(loaded, first, CHECK_QUESTION, first_ids)
    other = saliency(loaded, second, CHECK_QUESTION, _greedy_ids(loaded, second, CHECK_QUESTION))
    pathway = [m for m in (_projector(loaded.model), _module(loaded.model, VISION_NAMES)) if m is not None]
    saved = [{name: tensor.detach().clone() for name, tensor in m.state_dict().items()} for m in pathway]
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():  # cascading randomisation of the whole image pathway, projector and encoder
            for module in pathway:
                for parameter in module.parameters():
                    scale = float(parameter.detach().float().std()) if parameter.numel() > 1 else 0.0
                    noise = torch.randn(parameter.shape, generator=generator) * (scale or 0.02)
                    parameter.copy_(noise.to(parameter.device, parameter.dtype))
        randomised = saliency(loaded, first, CHECK_QUESTION, first_ids)
    finally:
        for module, state in zip(pathway, saved, strict=True):
            module.load_state_dict(state)
    return SanityCheck(rank_correlation(real, randomised), rank_correlation(real, other))
