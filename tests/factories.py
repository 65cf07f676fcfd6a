"""Building blocks for tests: accounts, a study, an answer. Everything goes through the real services,
except the study row (import makes studies from DICOM files), which is written here with its audit event as
an import would, so that the audit trail vouches for it."""

from __future__ import annotations

import itertools
import uuid

from compliance.policy import Action
from medvqa.db import Study
from medvqa.db.engine import Database
from medvqa.services import audit
from medvqa.services.answers import AnswerRecord, record_answer
from medvqa.services.audit import Actor
from medvqa.services.transaction import write
from medvqa.services.users import add_user

OPERATOR = Actor(name="cli:test", role="admin")
PASSWORD = "correct horse battery"
_counter = itertools.count(1)

__all__ = ["OPERATOR", "PASSWORD", "Actor", "make_answer", "make_study", "make_user"]


def make_user(db: Database, role: str, username: str | None = None) -> Actor:
    username = username or f"{role.replace('_', '')}{next(_counter)}"
    user = add_user(db, OPERATOR, username, PASSWORD, role)
    return Actor(name=user.username, role=role, user_id=user.id)


def make_study(db: Database) -> int:
    def work(session):
        study = Study(study_uid=f"2.25.{uuid.uuid4().int}", patient_pseudonym="anon-1", modality="CT")
        session.add(study)
        session.flush()
        audit.record(session, OPERATOR, Action.STUDY_IMPORT, "study", study.id)
        return study.id

    return write(db, work)


def make_answer(db: Database, actor: Actor, study_id: int | None = None) -> int:
    record = AnswerRecord(
        text="yes",
        model_ref="tiny-test-model@" + "0" * 12,
        prompt_version="vqa-v1",
        preprocess_hash="a" * 64,
        backend="transformers",
        latency_ms=12.5,
        confidence=0.8,
        token_scores=[-0.1],
        decoding={"do_sample": False, "max_new_tokens": 16},
    )
    answer = record_answer(db, actor, study_id or make_study(db), "Is there a fracture?", record)
    return answer.id
