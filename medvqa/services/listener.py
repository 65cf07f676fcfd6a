"""`medvqa listen`: modalities and PACS push studies to medvqa over DIMSE (C-STORE), into the import path.

Each accepted association's instances are written to a spool folder (fsynced before success is answered), then
imported when the association ends, one association at a time, through the same path as files (checks,
de-identification, store, one audit event per study with `via: dimse`). Each association gets one audit event
(`pacs:association:receive`: calling AE title, host, counts) and one log line; a refused association (a calling
AE title or host not in MEDVQA_LISTEN_CALLING_AES) gets a `denied` event and a log line. Spools left by a
listener that was killed are imported when the next one starts, so nothing acknowledged is lost.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compliance.policy import Action
from medvqa.errors import MedVQAError
from medvqa.pacs.dimse import Delivery, StorageListener
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.preparation import describe_unexpected
from medvqa.services.studies import ImportReport, Received, import_received, worker_pool
from medvqa.services.transaction import write

if TYPE_CHECKING:
    from medvqa.config import Settings
    from medvqa.db.engine import Database
    from medvqa.services.audit import Actor

log = logging.getLogger("medvqa.listen")
BATCH_FILES = 32


def spool_root(settings: Settings) -> Path:
    return settings.home / "spool" / "listen"


def listen(
    db: Database,
    actor: Actor,
    settings: Settings,
    stop: threading.Event,
    *,
    port: int | None = None,
    ae_title: str | None = None,
    on_ready: Callable[[StorageListener], None] | None = None,
) -> None:
    """Run the listener until `stop` is set; then finish importing what was received, and return."""
    authorize(db, actor, Action.PACS_RECEIVE, "pacs")
    root = spool_root(settings)
    pending: queue.Queue[Delivery] = queue.Queue()

    def denied(ae_title: str, host: str, reason: str) -> None:
        log.warning("association from %s@%s refused: %s", _clean(ae_title), host, reason)
        details = {"calling_ae": _clean(ae_title), "host": host, "reason": reason}
        _audit(db, actor, details, "denied")

    listener = StorageListener(settings, root, pending.put, denied, port, ae_title)
    for leftover in sorted(root.glob("*")) if root.is_dir() else []:
        if leftover.is_dir():  # received by a listener that stopped before importing it
            pending.put(Delivery.left_over(leftover))
    listener.start()
    log.info("listening on %s:%d as %s", listener.address, listener.bound_port, listener.ae_title)
    if on_ready:
        on_ready(listener)
    try:
        while not (stop.is_set() and pending.empty()):
            try:
                association = pending.get(timeout=0.2)
            except queue.Empty:
                if stop.is_set():
                    listener.stop()  # hands over associations still open
                continue
            _import_or_keep(db, actor, settings, association)
    finally:
        listener.stop()
        while not pending.empty():
            _import_or_keep(db, actor, settings, pending.get())
    log.info("stopped")


def _import_or_keep(db: Database, actor: Actor, settings: Settings, association: Delivery) -> None:
    """Import an association; when that fails (the database is down), keep its spool for the next start and
    go on listening: what was acknowledged is never lost."""
    try:
        import_association(db, actor, settings, association)
    except Exception as exc:
        reason = str(exc) if isinstance(exc, MedVQAError) else describe_unexpected(exc)
        log.error(
            "association from %s@%s: not imported (%s); kept in %s and imported at the next start",
            _clean(association.ae_title),
            association.host,
            reason,
            association.spool,
        )


def import_association(db: Database, actor: Actor, settings: Settings, association: Delivery) -> ImportReport:
    """Import one association's spool in batches, audit it, log one line, and remove the spool."""
    files = sorted(association.spool.glob("*.dcm"))
    report = ImportReport()
    if not files and not association.refused:  # a C-ECHO, or nothing sent: a log line, no audit event
        log.info("association from %s@%s: nothing sent", _clean(association.ae_title), association.host)
        shutil.rmtree(association.spool, ignore_errors=True)
        return report
    with worker_pool(settings) as pool:
        for start in range(0, len(files), BATCH_FILES):
            batch = [
                Received(f"instance {start + n + 1} of {len(files)}", path.read_bytes())
                for n, path in enumerate(files[start : start + BATCH_FILES])
            ]
            report.outcomes.extend(import_received(db, actor, batch, settings, "dimse", pool).outcomes)
    counts = {status: report.count(status) for status in ("imported", "duplicate", "refused", "skipped")}
    held = sum(o.held for o in report.outcomes)
    details: dict[str, Any] = {
        "calling_ae": _clean(association.ae_title),
        "host": association.host,
        "received": len(files),
        "refused_on_receipt": len(association.refused),
        **counts,
        "held": held,
        "studies": report.study_ids,
    }
    _audit(db, actor, details, "success")
    reasons = sorted({o.reason for o in report.outcomes if o.status == "refused"} | set(association.refused))
    log.info(
        "association from %s@%s: %d received, %d imported, %d already stored, %d refused%s, %d held; studies %s",
        _clean(association.ae_title),
        association.host,
        len(files) + len(association.refused),
        counts["imported"],
        counts["duplicate"],
        counts["refused"] + len(association.refused),
        f" ({'; '.join(reasons)[:300]})" if reasons else "",
        held,
        ", ".join(map(str, report.study_ids)) or "none",
    )
    shutil.rmtree(association.spool, ignore_errors=True)
    return report


def _clean(text: str) -> str:
    return "".join(ch for ch in text if ch.isprintable())[:16]


def _audit(db: Database, actor: Actor, details: dict[str, Any], outcome: str) -> None:
    write(
        db,
        lambda session: audit.record(
            session, actor, Action.PACS_RECEIVE, "pacs", None, outcome=outcome, details=details
        ),
    )
