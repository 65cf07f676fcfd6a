"""`medvqa store check [--prune]`: the store holds only files the database references, and the database
references only files that exist. A killed import (SIGKILL between storing a file and committing its row) can
leave unreferenced files and temporary files behind; pruning removes them, under the store lock held
exclusively, so no running import can be about to reference what is removed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from compliance.policy import Action
from medvqa.config import Settings
from medvqa.db import Instance
from medvqa.db.engine import Database
from medvqa.imaging.store import ContentStore
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.transaction import write

LOCK_WAIT_S = 30.0
LISTED = 20  # paths named in the report, at most, per kind


@dataclass
class StoreReport:
    files: int = 0  # content files in the store
    referenced: int = 0  # distinct storage paths the database references
    unreferenced: list[str] = field(default_factory=list)  # content files no row references
    leftovers: list[str] = field(default_factory=list)  # temporary files and markers of a killed import
    foreign: list[str] = field(default_factory=list)  # anything else (not ours: reported, never removed)
    missing: list[tuple[int, str]] = field(default_factory=list)  # (instance id, path) whose file is gone
    removed: int = 0

    @property
    def ok(self) -> bool:
        """Nothing missing, and nothing unreferenced left (none found, or all of it removed)."""
        return not self.missing and self.removed >= len(self.unreferenced) + len(self.leftovers)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "files": self.files,
            "referenced": self.referenced,
            "unreferenced": len(self.unreferenced),
            "leftovers": len(self.leftovers),
            "foreign": self.foreign[:LISTED],
            "missing": [{"instance_id": i, "path": p} for i, p in self.missing[:LISTED]],
            "missing_count": len(self.missing),
            "removed": self.removed,
        }


def check_store(db: Database, actor: Actor, settings: Settings, prune: bool = False) -> StoreReport:
    """Compare the store with the instance rows; with `prune`, remove unreferenced and temporary files (audited)."""
    authorize(db, actor, Action.STORE_CHECK, "store")
    store = ContentStore(settings.store_dir)
    report = StoreReport()
    with store.lock(exclusive=True, wait_s=LOCK_WAIT_S):
        content, leftovers, foreign = store.scan()  # under the exclusive lock every import marker is a stale one
        with db.read_session() as session:
            rows = session.execute(select(Instance.id, Instance.storage_path)).all()
        referenced = {path for _, path in rows}
        report.files, report.referenced = len(content), len(referenced)
        report.unreferenced = sorted(content - referenced)
        report.leftovers = sorted(leftovers)
        report.foreign = sorted(foreign)
        report.missing = sorted((row_id, path) for row_id, path in rows if path not in content)
        if prune and (report.unreferenced or report.leftovers):
            removed = store.remove_unreferenced(set(report.unreferenced), referenced)
            for relative in report.leftovers:
                store.remove_leftover(relative)
            report.removed = len(removed) + len(report.leftovers)
            details = {"removed_unreferenced": len(removed), "removed_temporary": len(report.leftovers)}
            write(db, lambda session: audit.record(session, actor, Action.STORE_CHECK, "store", None, details=details))
    return report
