"""Who may do what: a role x action table, deny by default.

Actions are named `source:subject:action`, the same strings the audit trail records, so a refusal
and a success of the same action read alike in the log.
"""

from __future__ import annotations

import enum

# The demo accounts' password, published in the README: it signs in from this machine only, and the
# workbench refuses to listen on another address while an account still has it.
DEMO_PASSWORD = "medvqa-demo-password"


class Role(enum.StrEnum):
    CLINICIAN = "clinician"
    REVIEWER = "reviewer"
    ML_ENGINEER = "ml_engineer"
    AUDITOR = "auditor"
    ADMIN = "admin"


ROLE_DESCRIPTIONS: dict[Role, str] = {
    Role.CLINICIAN: "Opens studies, asks questions, rates answers.",
    Role.REVIEWER: "Adjudicates answers, double-reads, signs off, confirms held instances.",
    Role.ML_ENGINEER: "Runs fine-tuning rounds, compares adapters, requests promotion and rollback.",
    Role.AUDITOR: "Reads and verifies the audit trail, exports it.",
    Role.ADMIN: "Manages users and roles, approves promotions.",
}


class Action(enum.StrEnum):
    USER_CREATE = "user:account:create"
    USER_DISABLE = "user:account:disable"
    USER_ENABLE = "user:account:enable"
    USER_CHANGE_ROLE = "user:account:change_role"
    USER_UNLOCK = "user:account:unlock"
    USER_LIST = "user:account:list"
    ACCOUNT_LOCKOUT = "auth:account:lockout"
    SESSION_LOGIN = "auth:session:login"
    SESSION_LOGOUT = "auth:session:logout"
    SESSION_RESUME = "auth:session:resume"
    STUDY_IMPORT = "study:study:import"
    STUDY_LIST = "study:study:list"
    STUDY_VIEW = "study:study:view"
    PACS_FIND = "pacs:study:find"
    PACS_RETRIEVE = "pacs:study:retrieve"
    PACS_RECEIVE = "pacs:association:receive"
    INSTANCE_CONFIRM = "study:instance:confirm_burned_in"
    INSTANCE_CLEAN = "study:instance:clean_burned_in"
    QUESTION_ASK = "answer:question:ask"
    HEATMAP_CREATE = "answer:heatmap:create"
    FEEDBACK_CREATE = "answer:feedback:create"
    FEEDBACK_SUPERSEDE = "answer:feedback:supersede"
    REVIEW_CREATE = "answer:review:create"
    REVIEW_SIGN = "answer:review:sign"
    DATASET_SNAPSHOT = "training:dataset:snapshot"
    ROUND_RUN = "training:round:run"
    ROUND_JOB_START = "training:round:start"
    ROUND_JOB_CANCEL = "training:round:cancel"
    ADAPTER_READ = "model:adapter:read"
    MODEL_CALIBRATE = "model:calibration:fit"
    MODEL_VALIDATE = "model:validation:sign"
    MODEL_VALIDATION_REVOKE = "model:validation:revoke"
    ADAPTER_PROMOTE_REQUEST = "model:adapter:request_promotion"
    ADAPTER_PROMOTE_APPROVE = "model:adapter:approve_promotion"
    ADAPTER_ROLLBACK = "model:adapter:rollback"
    AUDIT_READ = "audit:event:read"
    AUDIT_EXPORT = "audit:event:export"
    AUDIT_VERIFY = "audit:chain:verify"
    AUDIT_ROTATE_KEY = "audit:anchor:rotate_key"
    DATABASE_UPGRADE = "system:database:upgrade"
    STORE_CHECK = "system:store:check"


_C, _R, _M, _A, _ADM = Role.CLINICIAN, Role.REVIEWER, Role.ML_ENGINEER, Role.AUDITOR, Role.ADMIN

POLICY: dict[Action, frozenset[Role]] = {
    Action.USER_CREATE: frozenset({_ADM}),
    Action.USER_DISABLE: frozenset({_ADM}),
    Action.USER_ENABLE: frozenset({_ADM}),
    Action.USER_CHANGE_ROLE: frozenset({_ADM}),
    Action.USER_UNLOCK: frozenset({_ADM}),
    Action.USER_LIST: frozenset({_A, _ADM}),
    Action.SESSION_LOGIN: frozenset({_C, _R, _M, _A, _ADM}),
    Action.ACCOUNT_LOCKOUT: frozenset({_C, _R, _M, _A, _ADM}),  # recorded when sign-in attempts lock a name
    Action.SESSION_LOGOUT: frozenset({_C, _R, _M, _A, _ADM}),
    Action.SESSION_RESUME: frozenset({_C, _R, _M, _A, _ADM}),
    Action.STUDY_IMPORT: frozenset({_C, _ADM}),
    Action.STUDY_LIST: frozenset({_C, _R, _M, _A, _ADM}),  # de-identified metadata only
    Action.STUDY_VIEW: frozenset({_C, _R}),
    Action.PACS_FIND: frozenset({_C, _R, _ADM}),  # the PACS's identifiers are shown, never stored
    Action.PACS_RETRIEVE: frozenset({_C, _R, _ADM}),  # through the import path: de-identified, audited
    Action.PACS_RECEIVE: frozenset({_ADM}),  # `medvqa listen`, started by an administrator
    Action.INSTANCE_CONFIRM: frozenset({_R}),
    Action.INSTANCE_CLEAN: frozenset({_R}),
    Action.QUESTION_ASK: frozenset({_C, _R}),
    Action.HEATMAP_CREATE: frozenset({_C, _R}),  # where the model looked, for an answer they may read
    Action.FEEDBACK_CREATE: frozenset({_C, _R}),
    Action.FEEDBACK_SUPERSEDE: frozenset({_C, _R}),
    Action.REVIEW_CREATE: frozenset({_R}),
    Action.REVIEW_SIGN: frozenset({_R}),
    Action.DATASET_SNAPSHOT: frozenset({_M}),
    Action.ROUND_RUN: frozenset({_M}),
    Action.ROUND_JOB_START: frozenset({_M}),  # from the Models page: a background process runs the round
    Action.ROUND_JOB_CANCEL: frozenset({_M}),
    Action.ADAPTER_READ: frozenset({_M, _ADM}),
    Action.MODEL_CALIBRATE: frozenset({_M}),  # confidences and abstention thresholds clinicians see
    Action.MODEL_VALIDATE: frozenset({_ADM}),  # a signed statement; the banner then says validated
    Action.MODEL_VALIDATION_REVOKE: frozenset({_ADM}),
    Action.ADAPTER_PROMOTE_REQUEST: frozenset({_M}),
    Action.ADAPTER_PROMOTE_APPROVE: frozenset({_ADM}),
    Action.ADAPTER_ROLLBACK: frozenset({_M, _ADM}),
    Action.AUDIT_READ: frozenset({_A, _ADM}),
    Action.AUDIT_EXPORT: frozenset({_A, _ADM}),
    Action.AUDIT_VERIFY: frozenset({_A, _ADM}),
    Action.AUDIT_ROTATE_KEY: frozenset({_ADM}),
    Action.DATABASE_UPGRADE: frozenset({_ADM}),
    Action.STORE_CHECK: frozenset({_ADM}),
}


def is_allowed(role: str, action: str) -> bool:
    """True only when the table grants `action` to `role`; unknown roles and actions are denied."""
    try:
        return Role(role) in POLICY.get(Action(action), frozenset())
    except ValueError:
        return False


def policy_markdown() -> str:
    """The policy as a markdown table, for the access-control document and the admin page."""
    roles = list(Role)
    lines = ["| action | " + " | ".join(roles) + " |", "|---|" + "---|" * len(roles)]
    for action in Action:
        marks = ["yes" if is_allowed(role, action) else "" for role in roles]
        lines.append(f"| `{action}` | " + " | ".join(marks) + " |")
    return "\n".join(lines)
