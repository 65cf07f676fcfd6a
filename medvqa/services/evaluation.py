"""`medvqa eval`: score a model (and adapter) on a VQA jsonl file, with the blind and shuffled baselines beside it."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from sqlalchemy import select

from medvqa.config import Settings
from medvqa.db import Adapter, AdapterStatus
from medvqa.db.engine import Database
from medvqa.errors import NotFound
from medvqa.model.generation import answer
from medvqa.model.loading import load_vlm
from medvqa.training.data import load_vqa_jsonl
from medvqa.training.evaluate import compare_with_baselines, evaluate
from medvqa.training.metrics import EvalReport


def base_model_path(settings: Settings) -> Path:
    """The checkpoint the workbench answers with: MEDVQA_BASE_MODEL, else the default model (built if absent)."""
    if settings.base_model is not None:
        return settings.base_model
    from medvqa.model.default_weights import ensure_default_model

    return ensure_default_model(settings.home)


def adapter_folder(db: Database, adapter: str | None) -> Path | None:
    """An adapter given by database id or folder; None (no option) means the live adapter, if there is one."""
    with db.read_session() as session:
        if adapter is None:
            live = session.scalars(select(Adapter).where(Adapter.status == AdapterStatus.LIVE)).first()
            return Path(live.path) if live else None
        if adapter.isdigit():
            row = session.get(Adapter, int(adapter))
            if row is None:
                raise NotFound(f"adapter {adapter} does not exist")
            return Path(row.path)
    folder = Path(adapter)
    if not folder.is_dir():
        raise NotFound(f"adapter {adapter!r} is neither an adapter id nor a folder")
    return folder


def run_evaluation(
    db: Database,
    settings: Settings,
    data: Path,
    *,
    model: Path | None = None,
    adapter: str | None = None,
    limit: int | None = None,
    baselines: bool = True,
    progress: bool = False,
) -> EvalReport:
    """Answer every question of `data` greedily and score it; with `baselines`, again with black images and
    with other images of the file (the blind and shuffled baselines)."""
    from medvqa.model.adapters import load_adapter

    examples = load_vqa_jsonl(data)[:limit]
    # An explicit --model runs bare unless --adapter is given; the workbench's model carries the live adapter.
    folder = adapter_folder(db, adapter) if model is None or adapter is not None else None
    loaded = load_vlm(model or base_model_path(settings), device=settings.device)
    if folder is not None:
        loaded = load_adapter(loaded, folder)

    def predict(image: Image.Image, question: str) -> str:
        return answer(loaded, image, question).text

    report = (compare_with_baselines if baselines else evaluate)(examples, predict, progress=progress)
    return report.with_provenance(model_ref=loaded.model_ref, adapter_ref=loaded.adapter_ref, data=str(data))
