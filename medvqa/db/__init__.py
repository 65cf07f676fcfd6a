"""The data layer: typed SQLAlchemy models, engines, and migrations."""

from medvqa.db.audit import AuditEvent
from medvqa.db.base import Base
from medvqa.db.identity import Role, SignInAttempt, User, UserSession
from medvqa.db.imaging import Instance, Series, Study
from medvqa.db.training import Adapter, AdapterStatus, Dataset, ModelValidation, TrainingRound
from medvqa.db.vqa import Answer, AnswerHeatmap, Feedback, Question, Review, Verdict

__all__ = [
    "Adapter",
    "AdapterStatus",
    "Answer",
    "AnswerHeatmap",
    "AuditEvent",
    "Base",
    "Dataset",
    "Feedback",
    "Instance",
    "ModelValidation",
    "Question",
    "Review",
    "Role",
    "Series",
    "SignInAttempt",
    "Study",
    "TrainingRound",
    "User",
    "UserSession",
    "Verdict",
]
