"""The exceptions medvqa raises on purpose. Each message says what went wrong and how to fix it."""


class MedVQAError(Exception):
    """Base class: an expected failure with a message a clinician or an admin can act on."""


class ConfigError(MedVQAError):
    """A configuration value is wrong; the message names the variable."""


class DatabaseError(MedVQAError):
    """The database is unreachable, not migrated, or refused a write."""


class AccessDenied(MedVQAError):
    """The actor's role may not perform the action (the refusal is audited)."""


class NotFound(MedVQAError):
    """A referenced record does not exist."""


class InvalidInput(MedVQAError):
    """A value given by a person or a file is not acceptable."""


class InvalidSettings(InvalidInput, ValueError):
    """A settings object (LoRA, training, gate) got a value it cannot use; still a ValueError for callers."""


class IdempotencyConflict(MedVQAError):
    """The same idempotency key was used again with a different body."""


class ImportRefused(MedVQAError):
    """One input file cannot be imported; the message says why, naming no patient identifier."""


class ImportSkipped(MedVQAError):
    """A file that is not an instance to import (a DICOMDIR index), passed over on purpose."""


class HeldForReview(MedVQAError):
    """An instance may carry burned-in text and waits for a reviewer's confirmation."""


class ModelBuildError(MedVQAError):
    """The default model could not be converted or built; the message names the file or step and the fix."""


class ModelError(MedVQAError):
    """A model checkpoint cannot be used: missing, not a checkpoint, unsupported, or failed to load."""


class AdapterMismatch(ModelError):
    """A LoRA adapter does not fit the loaded base model (another base, other shapes or target modules)."""


class PacsError(MedVQAError):
    """A PACS could not be reached or refused a request; the message names the PACS, never a patient."""
