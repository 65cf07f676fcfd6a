"""What a fine-tuning round records so that it can be rerun: the code version, the environment, and the exact
training data file (the snapshot's train split, optionally mixed with a base dataset)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import medvqa

REPOSITORY = Path(__file__).resolve().parents[2]
_SOURCE_PACKAGES = ("medvqa", "compliance")


def source_sha256(root: Path = REPOSITORY) -> str:
    """SHA-256 over the Python sources of medvqa and compliance (path and content, sorted): the code that ran,
    whether or not it was committed."""
    digest = hashlib.sha256()
    for package in _SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _git(*args: str) -> str | None:
    """A read-only git query in the checkout, or None outside a checkout or without git."""
    try:
        done = subprocess.run(["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version() -> str:
    """`<package version>+<commit>[.dirty]` (at most 64 characters), or the package version outside a checkout."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return medvqa.__version__
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return f"{medvqa.__version__}+{commit[:12]}{'.dirty' if dirty else ''}"


def environment(device: str) -> dict[str, Any]:
    """Interpreter, libraries, hardware and code identity: what a rerun must match to give the same adapter."""
    import numpy
    import peft
    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device": device,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "numpy": numpy.__version__,
            "medvqa": medvqa.__version__,
        },
        "git_commit": _git("rev-parse", "HEAD"),
        "source_sha256": source_sha256(),
    }


def mixed_training_file(train_file: Path, base_data: Path | None, folder: Path) -> Path:
    """The file to train on: the snapshot's train split alone, or together with `base_data` in one jsonl named
    by its content hash (image paths made absolute, question ids prefixed so the two sources cannot collide)."""
    if base_data is None:
        return train_file
    rows = [*_rows(train_file, "feedback"), *_rows(base_data, "base")]
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    target = folder / f"{hashlib.sha256(text.encode()).hexdigest()}.jsonl"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        scratch = target.with_suffix(".tmp")
        scratch.write_text(text, encoding="utf-8")
        os.replace(scratch, target)
    return target


def _rows(path: Path, prefix: str) -> list[dict[str, Any]]:
    from medvqa.training.data import load_vqa_jsonl  # validates the file (fields, images) first

    load_vqa_jsonl(path)
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            row["qid"] = f"{prefix}:{row['qid']}"
            row["image"] = str((path.parent / row["image"]).resolve())
            rows.append(row)
    return rows
