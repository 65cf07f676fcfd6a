"""Stage 0 of the default recipe: supervised pre-training of the vision tower on image-level labels.

No pretrained vision encoder is available offline, and the answer loss alone (stages 1 and 2) teaches a tower
trained from scratch very little about the image: the language model learns to answer blind. VQA-RAD's
training questions carry image-level facts, though: every image has an organ (HEAD, CHEST, ABD), and many
modality and plane questions name the modality (CT, MRI, X-ray, ultrasound) or the plane. This stage turns
those into labels and trains the tower, through the transformers Trainer, to predict them from augmented images
(small affine jitter and contrast changes; never flips, since left and right are answers). Only the tower is
kept; the classification heads are thrown away.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvqa.training.collate import load_rgb
from medvqa.training.data import VQAExample
from medvqa.training.metrics import normalize_answer

if TYPE_CHECKING:
    import torch

IGNORE = -100
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "organ": ("head", "chest", "abdomen"),
    "modality": ("ct", "mri", "xray", "ultrasound"),
    "plane": ("axial", "coronal", "sagittal", "frontal"),
}
# Normalised words (see normalize_answer: "x-ray" -> "x ray") that name each class.
KEYWORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "modality": {
        "ct": ("ct", "cta"),
        "mri": ("mri", "mr", "t1", "t2", "flair", "dwi", "adc", "diffusion"),
        "xray": ("xray", "x ray", "xr", "cxr", "radiograph", "plain film", "film"),
        "ultrasound": ("ultrasound", "sonogram", "us"),
    },
    "plane": {
        "axial": ("axial", "transverse"),
        "coronal": ("coronal",),
        "sagittal": ("sagittal", "saggital"),
        "frontal": ("pa", "ap", "posteroanterior", "anteroposterior", "posterior anterior", "frontal"),
    },
}
_ORGANS = {"HEAD": "head", "CHEST": "chest", "ABD": "abdomen"}


def named_classes(attribute: str, text: str) -> set[str]:
    """The classes of `attribute` whose keywords occur as whole words in normalised `text`."""
    padded = f" {normalize_answer(text)} "
    return {name for name, words in KEYWORDS[attribute].items() if any(f" {word} " in padded for word in words)}


def image_labels(examples: Sequence[VQAExample]) -> dict[Path, dict[str, int]]:
    """Class index per attribute per image, from that image's training questions (IGNORE where unknown).

    Organ: the rows' organ field. Modality and plane: an open answer that names exactly one class
    ("MR - FLAIR" -> mri), or a yes to a closed question that names exactly one ("Is this a CT?" yes -> ct).
    A no says too little ("Is this an MRI?" no) and is not used. Where an image's rows disagree the most
    frequent class wins, and a tie leaves the attribute unknown.
    """
    votes: dict[Path, dict[str, Counter[str]]] = {}
    for example in examples:
        image = votes.setdefault(example.image_path, {name: Counter() for name in ATTRIBUTES})
        if example.organ.upper() in _ORGANS:
            image["organ"][_ORGANS[example.organ.upper()]] += 1
        answer = normalize_answer(example.answer)
        if answer == "no":
            continue
        text = example.question if answer == "yes" else example.answer
        for attribute in KEYWORDS:
            named = named_classes(attribute, text)
            if len(named) == 1:
                image[attribute][named.pop()] += 1
    labels: dict[Path, dict[str, int]] = {}
    for path, counters in votes.items():
        labels[path] = {}
        for attribute, counter in counters.items():
            ranked = counter.most_common(2)
            clear = ranked and (len(ranked) == 1 or ranked[0][1] > ranked[1][1])
            labels[path][attribute] = ATTRIBUTES[attribute].index(ranked[0][0]) if clear else IGNORE
    return labels


class _ImageDataset:
    """Each labelled image `repeats` times per epoch (one pass over 300 images is too short a Trainer epoch)."""

    def __init__(self, items: list[tuple[Path, dict[str, int]]], repeats: int) -> None:
        self.items, self.repeats = items, repeats

    def __len__(self) -> int:
        return len(self.items) * self.repeats

    def __getitem__(self, index: int) -> tuple[Path, dict[str, int]]:
        return self.items[index % len(self.items)]


class _AugmentingCollator:
    """Processor pixels (cached per image), then seeded MONAI affine and contrast jitter; no flips."""

    def __init__(self, image_processor: Any, image_size: int, seed: int) -> None:
        from monai.transforms.compose import Compose
        from monai.transforms.intensity.array import RandAdjustContrast
        from monai.transforms.spatial.array import RandAffine

        self.image_processor = image_processor
        self.cache: dict[Path, torch.Tensor] = {}
        shift = 0.06 * image_size
        self.augment = Compose(
            [
                RandAffine(
                    prob=0.9,
                    rotate_range=(0.12,),
                    scale_range=(0.12, 0.12),
                    translate_range=(shift, shift),
                    padding_mode="border",
                ),
                RandAdjustContrast(prob=0.5, gamma=(0.7, 1.4)),
            ]
        )
        self.augment.set_random_state(seed)

    def pixels(self, path: Path) -> torch.Tensor:
        if path not in self.cache:
            processed = self.image_processor(images=[load_rgb(path)], return_tensors="pt")
            self.cache[path] = processed["pixel_values"][0]
        return self.cache[path]

    def __call__(self, batch: list[tuple[Path, dict[str, int]]]) -> dict[str, Any]:
        import torch

        # RandAdjustContrast needs non-negative input: shift each image to >= 0 and back around the change.
        images = []
        for path, _ in batch:
            pixels = self.pixels(path)
            low = pixels.min()
            augmented = self.augment(pixels - low)
            plain = augmented.as_tensor() if hasattr(augmented, "as_tensor") else augmented  # MONAI MetaTensor
            images.append(plain + low)
        labels = {name: torch.tensor([item[1][name] for item in batch]) for name in ATTRIBUTES}
        return {"pixel_values": torch.stack(images).float(), **labels}


def _classifier(tower: Any, feature_layer: int, drop_class_token: bool) -> Any:
    """The tower with one linear head per attribute over its mean-pooled patch features (those LLaVA reads)."""
    import torch

    width = tower.config.hidden_size

    class AttributeClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = tower
            self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(width, len(c)) for name, c in ATTRIBUTES.items()})

        def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
            hidden: torch.Tensor = self.tower(pixel_values, output_hidden_states=True).hidden_states[feature_layer]
            return (hidden[:, 1:] if drop_class_token else hidden).mean(dim=1)

        def forward(self, pixel_values: torch.Tensor, **labels: torch.Tensor) -> dict[str, torch.Tensor]:
            pooled = self.features(pixel_values)
            logits = {name: head(pooled) for name, head in self.heads.items()}
            loss = pooled.sum() * 0.0  # keeps a graph when no label in the batch is known
            for name, target in labels.items():
                if bool((target != IGNORE).any()):
                    loss = loss + torch.nn.functional.cross_entropy(logits[name], target, ignore_index=IGNORE)
            return {"loss": loss, **{f"logits_{name}": value for name, value in logits.items()}}

    return AttributeClassifier()


def pretrain_vision_tower(
    model: Any,
    processor: Any,
    examples: Sequence[VQAExample],
    *,
    epochs: float,
    learning_rate: float,
    batch_size: int,
    seed: int,
    progress: bool,
    repeats: int = 8,
) -> dict[str, Any]:
    """Train `model`'s LLaVA vision tower in place on `image_labels(examples)`; returns the stage summary.

    The summary holds the label counts and, per attribute, the accuracy on the un-augmented training images
    (a check that the tower learnt something, not a held-out figure).
    """
    import torch

    from medvqa.model.default_weights import vision_modules
    from medvqa.training.train import TrainSettings, trainer_for

    labels = image_labels(examples)
    items = sorted(labels.items(), key=lambda item: str(item[0]))
    tower = vision_modules(model)["vision_tower"]
    config = model.config
    layer = config.vision_feature_layer if isinstance(config.vision_feature_layer, int) else -1
    drop = config.vision_feature_select_strategy == "default"
    classifier = _classifier(tower, layer, drop)
    size = int(config.vision_config.image_size)
    collator = _AugmentingCollator(processor.image_processor, size, seed)
    for parameter in classifier.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=learning_rate, weight_decay=0.05)
    stage = TrainSettings(epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, seed=seed)
    with tempfile.TemporaryDirectory(prefix="medvqa-pretrain-") as scratch:
        trainer = trainer_for(
            classifier, _ImageDataset(items, repeats), collator, stage, Path(scratch), progress, optimizer=optimizer
        )
        outcome = trainer.train()
    classifier.eval()
    accuracy: dict[str, float | None] = {}
    with torch.no_grad():
        device = next(classifier.parameters()).device
        pixels = torch.stack([collator.pixels(path) for path, _ in items]).to(device)
        pooled = torch.cat([classifier.features(pixels[start : start + 32]) for start in range(0, len(items), 32)])
        for name, head in classifier.heads.items():
            target = torch.tensor([item[1][name] for item in items], device=device)
            known = target != IGNORE
            predicted = head(pooled).argmax(dim=1)
            accuracy[name] = (
                round(float((predicted[known] == target[known]).float().mean()), 3) if known.any() else None
            )
    return {
        "epochs": epochs,
        "images": len(items),
        "labelled": {name: sum(item[1][name] != IGNORE for item in items) for name in ATTRIBUTES},
        "steps": int(outcome.global_step),
        "train_loss": round(float(outcome.training_loss), 4),
        "train_accuracy": accuracy,
        "seconds": round(float(outcome.metrics.get("train_runtime", 0.0)), 1),
    }
