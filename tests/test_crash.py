"""A writer process killed (SIGKILL) at random points, many times: every write that was acknowledged is
there, nothing half-written, chain verifies.

The writer (`python -m tests.workers crash-writer`) adds feedback in a loop and prints `ACK <key> <id>`
only after give_feedback returned. One database is reused across all trials, so the chain keeps growing
over the crashes. The kill may land anywhere: before or inside a transaction, during the commit, between
the commit and the anchor's commit line, or before the ACK is printed. That narrow window between commit
and commit line is also hit on purpose every few trials (the writer stalls there and is killed). Such a
kill leaves that event with only its intent line (written before the commit); verify reports unconfirmed
events, and intent lines of writes killed before their commit, as warnings (by design) and `strict`
verification refuses them. No kill can leave an event without its intent line.

The schedule is seeded; set MEDVQA_CRASH_SEED to replay another one.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select, text

from compliance.policy import Action
from medvqa.db import AuditEvent, Feedback
from medvqa.db.engine import Database
from medvqa.services.audit import Actor, verify

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 24
STALL_EVERY = 4
SEED = int(os.environ.get("MEDVQA_CRASH_SEED", "20240611"))
DELAY_S = (0.05, 0.6)  # from GO (the writer is connected and starts writing) to the kill
START_TIMEOUT_S = 60.0
WRITER_APP = "medvqa-crash-writer"


@dataclass
class Trial:
    number: int
    stall_at: int | None = None  # the write killed after its commit, before its anchor append
    acked: dict[str, int] = field(default_factory=dict)  # key -> feedback id the writer announced


class Writer:
    """One `crash-writer` process. It starts (imports, opens its Database, connects), says READY and
    waits for GO on stdin, so that the next trial's writer can start while this one is writing."""

    def __init__(
        self, trial: int, env: dict[str, str], actor: Actor, answer_id: int, log: Path, stall_at: int | None
    ) -> None:
        self.trial, self.log, self.stall_at = trial, log, stall_at
        command = [
            *(sys.executable, "-m", "tests.workers", "crash-writer"),
            f"--trial={trial}",
            f"--answer-id={answer_id}",
            f"--user-id={actor.user_id}",
            f"--user-name={actor.name}",
            f"--role={actor.role}",
            *([] if stall_at is None else [f"--stall-before-anchor={stall_at}"]),
        ]
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.stalled = threading.Event()
        with log.open("w") as stderr:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=_writer_env(env, trial),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:  # until EOF, that is until the process is gone
            if not line.endswith("\n"):
                break  # cut short by the kill: not an acknowledgement
            self.lines.append(line.rstrip("\n"))
            if line == "READY\n":
                self.ready.set()
            elif line == "STALL\n":
                self.stalled.set()

    def run_and_kill(self, delay_s: float) -> Trial:
        """Let it write for `delay_s` (or until it stalls), SIGKILL it, return the writes it acknowledged."""
        stalled = False
        try:
            started = self.ready.wait(START_TIMEOUT_S)
            if started:
                assert self.process.stdin is not None
                self.process.stdin.write("GO\n")
                self.process.stdin.flush()
                if self.stall_at is None:
                    time.sleep(delay_s)
                else:
                    stalled = self.stalled.wait(START_TIMEOUT_S)
            alive = self.process.poll() is None
        finally:
            self.kill()
        assert started, f"trial {self.trial}: the writer never became ready:\n{self.log.read_text()}"
        assert alive, f"trial {self.trial}: the writer stopped before it was killed:\n{self.log.read_text()}"
        assert stalled or self.stall_at is None, f"trial {self.trial}: no STALL:\n{self.log.read_text()}"
        assert self.process.returncode == -signal.SIGKILL
        assert not self.reader.is_alive()
        assert self.lines[0] == "READY", self.lines[:3]
        result = Trial(self.trial, self.stall_at)
        acks = self.lines[1:]
        if self.stall_at is not None:
            assert acks.pop() == "STALL"
            assert len(acks) == self.stall_at
        for number, line in enumerate(acks):
            word, key, feedback_id = line.split(" ")
            assert (word, key) == ("ACK", f"key-{self.trial}-{number}"), f"acknowledged out of order: {line!r}"
            result.acked[key] = int(feedback_id)
        return result

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.reader.join(timeout=10)
        if self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()


def _writer_env(env: dict[str, str], trial: int) -> dict[str, str]:
    url = env["MEDVQA_DATABASE_URL"]
    if not url.startswith("postgresql"):
        return env
    # Name the writer's connections, so that the parent can wait for the server to end them.
    separator = "&" if "?" in url else "?"
    return {**env, "MEDVQA_DATABASE_URL": f"{url}{separator}application_name={WRITER_APP}-{trial}"}


def _wait_until_the_server_dropped_the_writer(db: Database, trial: int) -> None:
    """A killed client may have sent COMMIT just before it died. The server finishes (or aborts) that
    transaction on its own schedule; wait for its backend to end so the checks see the final state."""
    if db.backend != "postgresql":
        return  # SQLite commits inside the writer process, which is gone
    query = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = :app")
    deadline = time.monotonic() + 30
    while True:
        with db.read_session() as session:
            if session.scalar(query, {"app": f"{WRITER_APP}-{trial}"}) == 0:
                return
        assert time.monotonic() < deadline, "the server kept the killed writer's connection for 30 s"
        time.sleep(0.01)


def _check(db: Database, trials: list[Trial]) -> tuple[int, int]:
    """Assert the invariants over everything written so far; return (stored unacknowledged, unanchored)."""
    anchor = db.anchor.read()  # first: then every event it names is already in the database we read next
    with db.read_session() as session:
        rows = dict(session.execute(select(Feedback.idempotency_key, Feedback.id)).all())
        events = session.execute(
            select(AuditEvent.seq, AuditEvent.hash, AuditEvent.object_type, AuditEvent.object_id, AuditEvent.outcome)
            .where(AuditEvent.action == Action.FEEDBACK_CREATE)
            .order_by(AuditEvent.seq)
        ).all()
        heads = dict(session.execute(select(AuditEvent.seq, AuditEvent.hash)).all())

    # Every acknowledged write is there, with the id the writer was given.
    acked = {key: feedback_id for trial in trials for key, feedback_id in trial.acked.items()}
    missing = sorted(set(acked) - set(rows))
    assert not missing, f"acknowledged but lost: {missing}"
    assert all(rows[key] == feedback_id for key, feedback_id in acked.items())

    # Writes are sequential, so each trial stored a prefix of its keys: the acknowledged ones and at most
    # the one in flight when the kill came (committed, but killed before it could say so). No strays.
    stored_unacked = 0
    for trial in trials:
        numbers = sorted(int(key.rsplit("-", 1)[1]) for key in rows if key.startswith(f"key-{trial.number}-"))
        assert numbers == list(range(len(numbers))), f"trial {trial.number} has a gap: {numbers}"
        assert len(trial.acked) <= len(numbers) <= len(trial.acked) + 1, (trial.number, numbers, trial.acked)
        stored_unacked += len(numbers) - len(trial.acked)
    assert sum(1 for key in rows if key.startswith("key-")) == len(rows)

    # Nothing half-written: each row has exactly one success event naming it, and no event lacks its row.
    assert all(event.object_type == "feedback" and event.outcome == "success" for event in events)
    assert Counter(event.object_id for event in events) == Counter(str(row_id) for row_id in rows.values())

    # The anchor's commit lines never run ahead of the database, and agree with it wherever they record an
    # event; every event has its intent line, written (and fsynced) before its commit.
    assert all(seq in heads and hashes == {heads[seq]} for seq, hashes in anchor.commits.items()), "anchor disagrees"
    assert all(heads[seq] in anchor.intents.get(seq, set()) for seq in heads), "an event has no intent line"
    # An acknowledged write was confirmed before it was acknowledged; only a write killed between its
    # commit and its commit line may lack the latter, and that one was never acknowledged.
    unanchored = {seq for seq in heads if seq not in anchor.commits}
    event_of_row = {int(event.object_id): event.seq for event in events}
    unacked_seqs = {event_of_row[row_id] for key, row_id in rows.items() if key not in acked}
    assert unanchored <= unacked_seqs, "an acknowledged write (or an event that is no write) is not confirmed"
    # A writer killed while stalled before its commit line left exactly that write: stored, unconfirmed.
    for trial in trials:
        if trial.stall_at is not None:
            stalled_key = f"key-{trial.number}-{trial.stall_at}"
            assert stalled_key in rows, f"trial {trial.number}: the committed write is gone"
            assert event_of_row[rows[stalled_key]] in unanchored
    # Intent lines of writes killed before their commit name no event (or a hash the seq did not keep).
    unresolved = sum(
        len(digests - {heads.get(seq)} - anchor.commits.get(seq, set()) - anchor.aborts.get(seq, set()))
        for seq, digests in anchor.intents.items()
    )

    # verify accepts the chain, and counts both as warnings; strict mode refuses them.
    report = verify(db)
    assert report.ok, report.reason
    assert report.events == len(heads)
    assert report.anchored_seq == max(anchor.commits, default=0)
    assert report.unconfirmed_events == len(unanchored)
    assert report.first_unconfirmed_seq == min(unanchored, default=None)
    assert report.unresolved_intents == unresolved
    assert bool(report.warnings) == bool(unanchored or unresolved)
    assert verify(db, strict=True).ok == (not unanchored and not unresolved)
    return stored_unacked, len(unanchored)


def test_writer_killed_at_random_points_loses_no_acknowledged_write_and_leaves_no_half_write(
    db: Database, cli_env: dict[str, str], clinician: Actor, answer_id: int, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    trials: list[Trial] = []
    with db.read_session() as session:
        assert session.scalar(select(func.count()).select_from(Feedback)) == 0

    # Every STALL_EVERY-th trial, the kill is aimed at the window between a commit and its commit line,
    # which a random kill rarely hits (the writer stalls there); the other kills come at random times.
    plan = [
        (rng.uniform(*DELAY_S), rng.randrange(40) if number % STALL_EVERY == STALL_EVERY - 1 else None)
        for number in range(TRIALS)
    ]

    def start(number: int) -> Writer:
        log = tmp_path / f"writer-{number}.log"
        return Writer(number, cli_env, clinician, answer_id, log, stall_at=plan[number][1])

    upcoming = start(0)
    try:
        for number in range(TRIALS):
            current = upcoming
            assert current.ready.wait(START_TIMEOUT_S), current.log.read_text()
            if number + 1 < TRIALS:
                upcoming = start(number + 1)  # it starts up while this one writes; it waits for GO
            trials.append(current.run_and_kill(plan[number][0]))
            _wait_until_the_server_dropped_the_writer(db, number)
            stored_unacked, unanchored = _check(db, trials)
    finally:
        upcoming.kill()

    acknowledged = sum(len(trial.acked) for trial in trials)
    print(
        f"\ncrash test (seed {SEED}, {db.backend}): {TRIALS} kills, {acknowledged} acknowledged writes, "
        f"{stored_unacked} stored but never acknowledged, {unanchored} events without their commit line"
    )
    # The kills came while the writer was busy writing, not all before its first write.
    assert sum(1 for trial in trials if trial.acked) >= TRIALS // 2
    assert acknowledged >= TRIALS
    stalls = sum(1 for trial in trials if trial.stall_at is not None)
    assert stalls >= 5
    assert stored_unacked >= unanchored >= stalls
