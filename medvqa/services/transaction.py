"""One write = one transaction that holds the audit-chain lock and commits with its audit events. The new
events are written to the anchor outside the database twice: an intent line (fsynced) before the commit,
so no event can be committed that the anchor does not know, and a commit line after it. Serialization
failures, deadlocks and lock timeouts are retried; anything else rolls back whole."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from compliance.audit_chain import ABORT, COMMIT, INTENT, AnchorError
from medvqa.db import tracking
from medvqa.db.engine import Database
from medvqa.errors import DatabaseError

T = TypeVar("T")
log = logging.getLogger(__name__)

# Any constant works; it names "the audit chain" among PostgreSQL advisory locks.
CHAIN_LOCK_KEY = 0x6D65_6476_7161  # "medvqa"
PENDING_HEADS = "medvqa_pending_audit_heads"
RETRYABLE_SQLSTATES = {"40001", "40P01", "55P03"}  # serialization failure, deadlock, lock not available


def _is_retryable(exc: DBAPIError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate in RETRYABLE_SQLSTATES:
        return True
    return isinstance(exc, OperationalError) and "database is locked" in str(exc.orig)


def lock_audit_chain(session: Session) -> None:
    """Serialise writers on the audit chain. SQLite already holds its write lock (BEGIN IMMEDIATE)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK_KEY})


def write(db: Database, work: Callable[[Session], T]) -> T:
    """Run `work` in one transaction with the chain lock held; retry on contention; anchor around the commit.

    `work` may run more than once (on retry), so it must not have side effects outside the session.
    IntegrityError is not retried here: callers that race on a unique key decide what it means.
    When the intent line cannot be written (the anchor's storage is gone or full), nothing is committed.
    """
    for attempt in range(db.write_retries + 1):
        session = db.session()
        heads: list[tuple[int, str]] = []
        try:
            with session.begin():
                lock_audit_chain(session)
                result = work(session)
                session.flush()
                tracking.check_all_audited(session)
                heads = session.info.pop(PENDING_HEADS, [])
                _intend(db, heads)
            _confirm(db, heads)
            return result
        except IntegrityError:
            _abandon(db, heads)
            raise
        except DBAPIError as exc:
            _abandon(db, heads)
            if not _is_retryable(exc) or attempt == db.write_retries:
                raise DatabaseError(f"the database refused the write: {_first_line(exc)}") from exc
            time.sleep(min(0.5, 0.01 * 2**attempt) * random.uniform(0.5, 1.5))
        except BaseException:
            _abandon(db, heads)
            raise
        finally:
            session.close()
    raise AssertionError("unreachable")


def _intend(db: Database, heads: list[tuple[int, str]]) -> None:
    """Before the commit: an anchor that cannot record the events refuses the write (nothing commits)."""
    try:
        db.anchor.append(heads, INTENT, durable=True)
    except (OSError, AnchorError) as exc:
        heads.clear()  # nothing was written, so there is nothing to abandon
        raise DatabaseError(
            f"the audit anchor {db.anchor.path} cannot be written, so nothing was saved: {exc}"
        ) from exc


def _confirm(db: Database, heads: list[tuple[int, str]]) -> None:
    """The write has committed: a failing confirmation must not turn it into an error the caller would retry.
    Verify reports events whose commit line is missing as a warning (their intent line covers them)."""
    try:
        db.anchor.append(heads, COMMIT, durable=False)
    except (OSError, AnchorError) as exc:
        log.error("audit anchor %s: no commit line for events %s: %s", db.anchor.path, [s for s, _ in heads], exc)


def _abandon(db: Database, heads: list[tuple[int, str]]) -> None:
    """The intent was written but the commit failed: say so, so verify does not wait for these events."""
    if not heads:
        return
    try:
        db.anchor.append(heads, ABORT, durable=False)
    except (OSError, AnchorError) as exc:
        log.error("audit anchor %s: no abort line for events %s: %s", db.anchor.path, [s for s, _ in heads], exc)


def _first_line(exc: DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
