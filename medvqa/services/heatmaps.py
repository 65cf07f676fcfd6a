"""Where the model looked for an answer: made on request by the model that gave the answer, once, stored with
the answer (its hash is the heatmap's provenance), audited, and shown only when the model passes the sanity
checks (medvqa/model/saliency.py).

The answer is reproduced first (greedy decoding on the exact image, rebuilt from the recorded selection and
checked against its hash): a map is only made for the tokens the model really gave. The in-process backend
has it; a vLLM server does not expose gradients, so the workbench says so instead.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from compliance.policy import Action
from medvqa.db import Answer, AnswerHeatmap, Question
from medvqa.db.base import utcnow
from medvqa.errors import InvalidInput, ModelError, NotFound
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.transaction import write

if TYPE_CHECKING:
    from PIL.Image import Image

    from medvqa.config import Settings
    from medvqa.db.engine import Database
    from medvqa.model.loading import LoadedModel
    from medvqa.model.saliency import SaliencyMap, SanityCheck
    from medvqa.services.ask import ServingModel

_checks: dict[tuple[str, str | None], SanityCheck] = {}  # per model and adapter: the checks run once
_checks_lock = threading.Lock()


@dataclass(frozen=True)
class Heatmap:
    """An answer's heatmap as stored: the map, its hash, and the checks of the model that made it."""

    answer_id: int
    saliency: SaliencyMap
    sha256: str
    checks: dict[str, Any]
    created: bool  # made now (False: it was stored already)

    @property
    def trusted(self) -> bool:
        return shown(self.checks)

    def overlay(self, image: Image, opacity: float) -> Image:
        return self.saliency.overlay(image, opacity)


def shown(checks: dict[str, Any]) -> bool:
    """A map is shown only when its model passed at least one of the sanity checks."""
    return bool(checks.get("passes_model_randomisation") or checks.get("passes_data_check"))


def _in_process(model: ServingModel) -> LoadedModel:
    """The serving model's in-process weights; a vLLM server exposes no gradients, so no heatmap."""
    from medvqa.model.loading import LoadedModel

    if not isinstance(model.loaded, LoadedModel):
        raise ModelError("heatmaps need the in-process model (MEDVQA_MODEL_BACKEND=transformers); vLLM has none")
    return model.loaded


def model_checks(model: ServingModel) -> SanityCheck:
    """Adebayo et al.'s sanity checks for the serving model (and adapter), run once and kept."""
    from medvqa.model.saliency import sanity_check

    loaded = _in_process(model)
    key = (loaded.model_ref, loaded.adapter_ref)
    with _checks_lock:
        if key not in _checks:
            with model.lock:
                _checks[key] = sanity_check(loaded)
        return _checks[key]


def stored_heatmap(db: Database, answer_id: int) -> Heatmap | None:
    """The heatmap stored for an answer, if one was made."""
    from medvqa.model.saliency import SaliencyMap

    with db.read_session() as session:
        row = session.scalars(select(AnswerHeatmap).where(AnswerHeatmap.answer_id == answer_id)).one_or_none()
    if row is None:
        return None
    return Heatmap(
        answer_id, SaliencyMap.from_json({"grid": row.grid, "method": row.method}), row.sha256, row.checks, False
    )


def answer_heatmap(db: Database, actor: Actor, settings: Settings, model: ServingModel, answer_id: int) -> Heatmap:
    """The heatmap of answer `answer_id`: the stored one, or made now by `model`, which must be the model and
    adapter that gave the answer, and which must reproduce the answer on the recorded image."""
    from medvqa.model.generation import answer
    from medvqa.model.saliency import saliency
    from medvqa.services.ask import replay_model_input

    authorize(db, actor, Action.HEATMAP_CREATE, "answer", answer_id)
    existing = stored_heatmap(db, answer_id)
    if existing is not None:
        return existing
    with db.read_session() as session:
        found = session.execute(
            select(Answer, Question.text)
            .join(Question, Answer.question_id == Question.id)
            .where(Answer.id == answer_id)
        ).first()
    if found is None:
        raise NotFound(f"answer {answer_id} does not exist")
    row, question = found
    loaded = _in_process(model)
    if (row.model_ref, row.adapter_ref) != (loaded.model_ref, loaded.adapter_ref):
        raise InvalidInput(
            f"answer {answer_id} came from {row.model_ref} with adapter {(row.adapter_ref or 'none')[:12]}; the "
            "model serving now is another, so it cannot show where that model looked"
        )
    image, same_pixels = replay_model_input(db, actor, settings, answer_id)
    if not same_pixels:
        raise InvalidInput(f"the image of answer {answer_id} no longer matches its recorded hash; no heatmap")
    checks = model_checks(model).to_json()
    with model.lock:
        again = answer(loaded, image, question, prompt_version=row.prompt_version)
        if again.text != row.text:
            raise InvalidInput(f"the model no longer gives answer {answer_id} ({again.text!r}); no heatmap")
        found_map = saliency(loaded, image, question, again.token_ids, row.prompt_version)
    return _store(db, actor, answer_id, found_map, checks)


def _store(db: Database, actor: Actor, answer_id: int, found: SaliencyMap, checks: dict[str, Any]) -> Heatmap:
    from medvqa.model.saliency import SaliencyMap

    digest = found.sha256()

    def work(session: Session) -> Heatmap:
        existing = session.scalars(select(AnswerHeatmap).where(AnswerHeatmap.answer_id == answer_id)).one_or_none()
        if existing is not None:  # made meanwhile by another session: theirs stands
            kept = SaliencyMap.from_json({"grid": existing.grid, "method": existing.method})
            return Heatmap(answer_id, kept, existing.sha256, existing.checks, False)
        row = AnswerHeatmap(
            answer_id=answer_id,
            method=found.method,
            sha256=digest,
            grid=found.to_json()["grid"],
            checks=checks,
            created_by=actor.user_id,
            created_at=utcnow(),
        )
        session.add(row)
        session.flush()
        details = {"sha256": digest, "method": found.method, "shown": shown(checks)}
        audit.record(session, actor, Action.HEATMAP_CREATE, "answer", answer_id, details=details)
        return Heatmap(answer_id, found, digest, checks, True)

    return write(db, work)
