"""Preparing inputs for import: read, check, decode, look for burned-in text, de-identify, store. One outcome each.

The steps are independent per file, so a large import runs them in worker processes (MEDVQA_IMPORT_WORKERS,
default: one per CPU core). The parent reads each input's bytes (bounded) and hands them over, a few per worker
at a time, so memory stays bounded; it keeps the outcomes in input order, and learns which store files the
workers created (the import removes those that end up without a row). A worker that dies on a file (a decoder
crash, the memory limit) refuses the files it held with one line each, and a fresh pool takes the rest.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from compliance.deid import Deidentifier, DeidSettings
from medvqa.errors import ImportRefused, ImportSkipped
from medvqa.imaging.importer import InstanceRecord, prepare_instance
from medvqa.imaging.reader import ImportLimits, one_line
from medvqa.imaging.sources import Item, Listed, is_zip, read_bounded
from medvqa.imaging.store import ContentStore

Status = Literal["imported", "duplicate", "refused", "skipped"]
HELD_NOTE = "held until a reviewer confirms there is no burned-in text"
MIN_FILES_FOR_WORKERS = 16  # below this, starting processes costs more than it saves
IN_FLIGHT_PER_WORKER = 2
log = logging.getLogger("medvqa.services.studies")


@dataclass
class FileOutcome:
    """What became of one input (a file, a zip member, a DICOMDIR entry, a folder entry): one line each."""

    source: str
    status: Status
    reason: str = ""
    study_id: int | None = None
    held: bool = False
    values_corrected: int = 0  # retained values replaced or removed as invalid for their VR (never the values)

    def line(self) -> str:
        if self.status == "imported":
            return f"imported: {self.source}" + (f" ({HELD_NOTE})" if self.held else "")
        if self.status == "duplicate":
            return f"already stored: {self.source}"
        return f"{self.status}: {self.source}: {self.reason}"


Prepared = tuple[FileOutcome, InstanceRecord | None]


@dataclass(frozen=True)
class Preparer:
    """What every preparation needs; picklable, so worker processes get their own copy."""

    deid: DeidSettings
    store_root: Path
    limits: ImportLimits

    def prepare_all(
        self, items: list[Item], store: ContentStore, workers: int, pool: WorkerPool | None = None
    ) -> list[Prepared]:
        """One (outcome, record) per item, in order. Files the workers created are added to store.created.
        `pool`: workers kept across calls (a retrieve's batches); used when it was made for this preparer."""
        sources = sum(1 for item in items if not isinstance(item, Listed))
        if workers <= 1 or sources < MIN_FILES_FOR_WORKERS:
            deid = Deidentifier(self.deid)
            return [_prepare(item, deid, store, self.limits) for item in items]
        if pool is not None and pool.preparer == self:
            return list(_in_workers(self, items, store, pool))
        with WorkerPool(self, min(workers, sources)) as own:
            return list(_in_workers(self, items, store, own))


def _prepare(item: Item, deid: Deidentifier, store: ContentStore, limits: ImportLimits) -> Prepared:
    """One input's outcome, and its record when it is ready to be written. Every exception becomes a refusal."""
    if isinstance(item, Listed):
        return FileOutcome(item.name, item.status, one_line(item.reason)), None
    try:
        data = _read(item, limits)
    except Exception as exc:
        return _refusal(item.name, exc), None
    return _prepare_data(item.name, data, deid, store, limits)


def _read(item: Item, limits: ImportLimits) -> bytes:
    assert not isinstance(item, Listed)
    data = read_bounded(item, limits)
    if item.container == "zip" and is_zip(data[:4]):
        raise ImportRefused("a zip archive inside a zip archive is not opened (unpack it first)")
    return data


def _prepare_data(name: str, data: bytes, deid: Deidentifier, store: ContentStore, limits: ImportLimits) -> Prepared:
    outcome = FileOutcome(name, "imported")
    try:
        record = prepare_instance(data, deid, store, limits)
    except Exception as exc:
        return _refusal(name, exc), None
    outcome.held, outcome.values_corrected = record.held_for_burned_in_text, record.values_corrected
    return outcome, record


def _refusal(name: str, exc: Exception) -> FileOutcome:
    if isinstance(exc, ImportSkipped):
        return FileOutcome(name, "skipped", one_line(str(exc)))
    if isinstance(exc, ImportRefused):
        return FileOutcome(name, "refused", one_line(str(exc)))
    if isinstance(exc, OSError):
        return FileOutcome(name, "refused", f"could not be read or stored: {exc.strerror or type(exc).__name__}")
    return FileOutcome(name, "refused", unexpected(exc))


def unexpected(exc: BaseException) -> str:
    """A refusal line for an error nobody foresaw: its type and where it was raised (no message, which may quote
    a value of the file); the log gets the same, so it can be found and fixed."""
    described = describe_unexpected(exc)
    log.warning("import: %s; the input was refused", described)
    return f"{described}; nothing of it was kept"


def describe_unexpected(exc: BaseException) -> str:
    """'unexpected error (KeyError at frames.py:123)': the type and the innermost place, never the message."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"unexpected error ({type(exc).__name__}{where})"


# --- worker processes ----------------------------------------------------------------------------------------------

_worker: tuple[Deidentifier, ContentStore, ImportLimits] | None = None
Job = tuple[int, str, bytes]  # (position in the input, name, bytes)
Result = tuple[Prepared, list[str]]  # (outcome and record, store files the worker created)


def _worker_init(preparer: Preparer, importer: int) -> None:
    global _worker
    _die_with_importer(importer)
    os.environ["OMP_THREAD_LIMIT"] = "1"  # tesseract's own threads would compete with the other workers
    _worker = (Deidentifier(preparer.deid), ContentStore(preparer.store_root), preparer.limits)


def _die_with_importer(importer: int) -> None:
    """A worker must not outlive an import that was killed (it would go on storing files nobody references, and
    a pool's workers never see their queue close): a thread ends the worker as soon as the importing process is
    gone (a pidfd where the kernel has them, else polling)."""
    import select
    import threading

    def watch() -> None:
        try:
            handle = os.pidfd_open(importer)
        except (AttributeError, OSError):
            handle = None
        while True:
            if handle is not None:
                select.select([handle], [], [])
                os._exit(1)
            try:
                os.kill(importer, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass
            time.sleep(0.5)

    threading.Thread(target=watch, name="medvqa-import-watch", daemon=True).start()


def _worker_prepare(name: str, data: bytes) -> Result:
    assert _worker is not None, "the worker was not initialised"
    deid, store, limits = _worker
    store.created.clear()
    prepared = _prepare_data(name, data, deid, store, limits)
    return prepared, sorted(store.created)


def _pool(preparer: Preparer, workers: int) -> ProcessPoolExecutor:
    import multiprocessing

    # forkserver: workers start from a clean process, never a fork of one with threads (the workbench, a listener)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # imported once in the server: each worker starts in milliseconds
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(preparer, os.getpid()))


class WorkerPool:
    """Worker processes for one Preparer, started on first use and kept until closed, so that several imports
    (a retrieve's batches) share them. Use as a context manager."""

    def __init__(self, preparer: Preparer, workers: int) -> None:
        self.preparer, self.workers = preparer, max(1, workers)
        self._executor: ProcessPoolExecutor | None = None

    @property
    def executor(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = _pool(self.preparer, self.workers)
        return self._executor

    def discard(self) -> None:
        """Drop a broken pool; the next use starts a fresh one."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


class _Workers:
    """A bounded number of files in flight on a WorkerPool; a broken pool's files are retried one by one, each
    in a process of its own, so only the file that kills a worker is refused for it."""

    def __init__(self, pool: WorkerPool, store: ContentStore) -> None:
        self.pool, self.store = pool, store
        self.pending: deque[tuple[Job, Future[Result]]] = deque()
        self.results: dict[int, Prepared] = {}

    def submit(self, job: Job) -> None:
        self.pending.append((job, self.pool.executor.submit(_worker_prepare, job[1], job[2])))
        while len(self.pending) >= self.pool.workers * IN_FLIGHT_PER_WORKER:
            self.collect_one()

    def collect_one(self) -> None:
        job, future = self.pending.popleft()
        try:
            self._keep(job, future.result())
        except BrokenProcessPool:
            jobs = [job, *(other for other, _ in self.pending)]
            self.pending.clear()
            self.pool.discard()
            log.warning("import: a worker process died; its %d file(s) are retried one by one", len(jobs))
            for retried in jobs:
                self._alone(retried)

    def _alone(self, job: Job) -> None:
        with WorkerPool(self.pool.preparer, 1) as single:
            try:
                self._keep(job, single.executor.submit(_worker_prepare, job[1], job[2]).result())
            except BrokenProcessPool:
                reason = "reading it stopped the import worker (a crash, or the memory limit); nothing was kept"
                self.results[job[0]] = (FileOutcome(job[1], "refused", reason), None)

    def _keep(self, job: Job, result: Result) -> None:
        prepared, created = result
        self.results[job[0]] = prepared
        self.store.created.update(created)

    def drain(self) -> None:
        while self.pending:
            self.collect_one()


def _in_workers(preparer: Preparer, items: list[Item], store: ContentStore, pool: WorkerPool) -> Iterator[Prepared]:
    """The outcomes in input order; bytes are read here, one bounded input at a time."""
    running = _Workers(pool, store)
    try:
        for index, item in enumerate(items):
            if isinstance(item, Listed):
                running.results[index] = (FileOutcome(item.name, item.status, one_line(item.reason)), None)
                continue
            try:
                data = _read(item, preparer.limits)
            except Exception as exc:
                running.results[index] = (_refusal(item.name, exc), None)
            else:
                running.submit((index, item.name, data))
    finally:
        running.drain()
    for index in range(len(items)):
        yield running.results[index]
