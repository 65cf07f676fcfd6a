"""Code that runs in writer processes for tests/test_concurrency.py and tests/test_crash.py.

It lives in an importable module so that the 'spawn' start method can pickle the entry points, and so
that `python -m tests.workers crash-writer ...` can run it as a separate program. Workers receive plain
strings (a database URL, an anchor path) and build their own Database; engines never cross a process.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue as queue_module
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import text

from compliance.audit_chain import COMMIT, AuditAnchor
from medvqa.config import load_settings, normalize_database_url
from medvqa.db.engine import Database, build_engine
from medvqa.errors import IdempotencyConflict
from medvqa.services.audit import Actor
from medvqa.services.feedback import FeedbackInput, give_feedback

START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Submission:
    key: str
    verdict: str = "correct"
    comment: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What one give_feedback call returned: a stored row, or the name of the error it raised."""

    writer: int
    pid: int
    key: str
    comment: str | None
    feedback_id: int | None = None
    created: bool | None = None
    error: str | None = None


def open_database(url: str, anchor_path: str) -> Database:
    return Database(build_engine(normalize_database_url(url)), AuditAnchor(Path(anchor_path)))


def _warm_up(db: Database) -> None:
    """Connect before the start line, so that the writers race on the writes and not on connecting."""
    with db.read_session() as session:  # a read transaction: it never takes SQLite's write lock
        session.execute(text("SELECT 1"))


def submit_all(
    url: str,
    anchor_path: str,
    actor: Actor,
    answer_id: int,
    writer: int,
    submissions: Sequence[Submission],
    barrier: Any,
) -> list[Outcome]:
    """One writer: its own Database, wait for every other writer, then submit one after another."""
    db = open_database(url, anchor_path)
    try:
        _warm_up(db)
        barrier.wait(START_TIMEOUT_S)
        outcomes = []
        for item in submissions:
            feedback = FeedbackInput(answer_id, item.verdict, item.key, comment=item.comment)
            try:
                result = give_feedback(db, actor, feedback)
            except IdempotencyConflict as exc:
                outcomes.append(Outcome(writer, os.getpid(), item.key, item.comment, error=type(exc).__name__))
            else:
                outcomes.append(
                    Outcome(writer, os.getpid(), item.key, item.comment, result.feedback.id, result.created)
                )
        return outcomes
    finally:
        db.dispose()


def _run_job(job: tuple[Any, ...], barrier: Any) -> tuple[list[Outcome], list[str]]:
    """One thread (and one Database) per writer of this process's share of the job."""
    url, anchor_path, actor, answer_id, share = job
    outcomes: list[Outcome] = []
    failures: list[str] = []
    lock = threading.Lock()

    def run(writer: int, submissions: list[Submission]) -> None:
        try:
            done = submit_all(url, anchor_path, actor, answer_id, writer, submissions, barrier)
        except BaseException:
            barrier.abort()  # do not leave the other writers waiting for this one
            with lock:
                failures.append(f"writer {writer} (pid {os.getpid()}):\n{traceback.format_exc()}")
        else:
            with lock:
                outcomes.extend(done)

    threads = [threading.Thread(target=run, args=item) for item in share.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, failures


def pool_process(jobs: Any, results: Any, barrier: Any) -> None:
    """Entry point of one spawned pool process: run jobs until told to stop (None)."""
    while (job := jobs.get()) is not None:
        results.put(_run_job(job, barrier))


class WriterPool:
    """`writers` concurrent writers spread over `processes` OS processes started with 'spawn'.

    Starting a process costs an interpreter and the imports (about 0.7 s of CPU each), so the processes
    are started once and reused; every job still builds a new Database per writer from plain strings.
    All writers of a job are released at once by a barrier.
    """

    def __init__(self, writers: int, processes: int) -> None:
        if not 1 <= processes <= writers:
            raise ValueError("need 1 to `writers` processes")
        self.writers = writers
        context = multiprocessing.get_context("spawn")
        self._barrier = context.Barrier(writers)
        self._results = context.Queue()
        self._jobs = [context.Queue() for _ in range(processes)]
        self._processes = [
            context.Process(target=pool_process, args=(jobs, self._results, self._barrier), daemon=True)
            for jobs in self._jobs
        ]
        for process in self._processes:
            process.start()

    @property
    def pids(self) -> set[int]:
        return {process.pid for process in self._processes if process.pid is not None}

    def run(
        self,
        url: str,
        anchor_path: str,
        actor: Actor,
        answer_id: int,
        batches: list[list[Submission]],
        timeout_s: float = 240.0,
    ) -> list[Outcome]:
        """Run one writer per batch; raise if a writer failed with an error give_feedback may not raise."""
        if len(batches) != self.writers:
            raise ValueError(f"this pool runs exactly {self.writers} writers")
        self._barrier.reset()  # a failed earlier job may have left it broken
        shares: list[dict[int, list[Submission]]] = [{} for _ in self._jobs]
        for writer, batch in enumerate(batches):
            shares[writer % len(shares)][writer] = batch
        for jobs, share in zip(self._jobs, shares, strict=True):
            jobs.put((url, anchor_path, actor, answer_id, share))
        outcomes: list[Outcome] = []
        failures: list[str] = []
        for _ in self._jobs:
            try:
                done, failed = self._results.get(timeout=timeout_s)
            except queue_module.Empty:
                codes = [process.exitcode for process in self._processes]
                raise AssertionError(f"no report from a writer process in {timeout_s} s (exit codes {codes})") from None
            outcomes.extend(done)
            failures.extend(failed)
        if failures:
            raise AssertionError("writers failed:\n" + "\n".join(failures))
        return outcomes

    def close(self) -> None:
        for jobs in self._jobs:
            jobs.put(None)
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()


class StallingAnchor(AuditAnchor):
    """An anchor whose commit line number `stall_at` (from 0) announces STALL and never returns: the write
    before it has committed (its intent line is in the anchor), its commit line is not written, and the
    parent kills the process there."""

    def __init__(self, path: Path, key_path: Path, stall_at: int) -> None:
        super().__init__(path, key_path)
        self.stall_at, self.calls = stall_at, 0

    def append(self, heads: Iterable[tuple[int, str]], kind: str = COMMIT, durable: bool = True) -> None:
        if kind == COMMIT:
            if self.calls == self.stall_at:
                print("STALL", flush=True)
                time.sleep(3600)
            self.calls += 1
        super().append(heads, kind, durable)


def crash_writer(trial: int, actor: Actor, answer_id: int, stall_before_anchor: int | None = None) -> None:
    """Write feedback forever, announcing each key on stdout only once give_feedback has returned.

    It says READY once connected and starts writing when it reads GO on stdin. The database and the
    anchor come from MEDVQA_* variables, as for the `medvqa` command. The parent kills this process with
    SIGKILL at a random moment, or, with `stall_before_anchor` N, once write N has committed and is stuck
    before its anchor append (the narrow window a random kill rarely hits).
    """
    db = Database.from_settings(load_settings())
    if stall_before_anchor is not None:
        db.anchor = StallingAnchor(db.anchor.path, db.anchor.keys.path, stall_before_anchor)
    _warm_up(db)
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        return
    number = 0
    while True:
        key = f"key-{trial}-{number}"
        result = give_feedback(db, actor, FeedbackInput(answer_id, "partial", key, comment=f"trial {trial}"))
        print(f"ACK {key} {result.feedback.id}", flush=True)
        number += 1


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.workers")
    commands = parser.add_subparsers(dest="command", required=True)
    crash = commands.add_parser("crash-writer", help="write feedback until killed")
    crash.add_argument("--trial", type=int, required=True)
    crash.add_argument("--answer-id", type=int, required=True)
    crash.add_argument("--user-id", type=int, required=True)
    crash.add_argument("--user-name", required=True)
    crash.add_argument("--role", required=True)
    crash.add_argument("--stall-before-anchor", type=int, metavar="N", help="hang in write N's commit line")
    args = parser.parse_args(argv)
    actor = Actor(name=args.user_name, role=args.role, user_id=args.user_id)
    crash_writer(args.trial, actor, args.answer_id, args.stall_before_anchor)


if __name__ == "__main__":
    sys.exit(main())
