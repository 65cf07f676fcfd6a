"""Fine-tuning rounds started from the workbench: a background process, one at a time, whose state lives on
disk (MEDVQA_HOME/jobs/), so that it survives a browser refresh and the page only reads it.

A job is a folder `jobs/round-<UTC time>/` with `spec.json` (who started it, the round's options), `status.json`
(running, finished, failed or cancelled; its process id; the round it made) and `log.txt` (the round's own
output: snapshot, training progress, scoring). `jobs/running.lock` (created exclusively, holding the job's
folder name) makes it one at a time; a lock whose process is gone is stale and taken over. The process runs
`python -m medvqa.services.round_jobs JOB_FOLDER` in its own session (so cancel stops the whole process group)
and calls `run_round` as the ML engineer who started it: the round is audited as if run from the command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compliance.policy import Action
from medvqa.errors import InvalidInput, MedVQAError, NotFound
from medvqa.services import audit
from medvqa.services.access import authorize
from medvqa.services.audit import Actor
from medvqa.services.transaction import write
from medvqa.training.snapshot import collect_candidates

if TYPE_CHECKING:
    from medvqa.config import Settings
    from medvqa.db.engine import Database

RUNNING, FINISHED, FAILED, CANCELLED = "running", "finished", "failed", "cancelled"
LOCK = "running.lock"
_PROGRESS = re.compile(r"(\d+)/(\d+) \[")  # tqdm's "12/50 [00:10<00:30, ...]"


@dataclass(frozen=True)
class JobOptions:
    """What the page lets an ML engineer choose; the rest is MEDVQA_ROUND_* and the training defaults."""

    epochs: float = 1.0
    max_steps: int = -1
    since_round: int | None = None

    def __post_init__(self) -> None:
        if not self.epochs > 0 or self.max_steps == 0 or self.max_steps < -1:
            raise InvalidInput("epochs must be positive and max steps -1 (use epochs) or at least 1")


@dataclass(frozen=True)
class RoundJob:
    """A round job as its files say: its folder name, state, who started it, when, and what it made."""

    name: str
    state: str
    started_by: str
    started_at: str
    finished_at: str | None
    pid: int | None
    round_id: int | None
    gate_passed: bool | None
    error: str | None
    progress: float | None  # the training's share done, from its progress bar; None before training
    log_tail: str


@dataclass(frozen=True)
class Readiness:
    """Whether a round may start: reviewed answers usable for training, in all and since the last round."""

    usable: int
    since_last_round: int
    min_examples: int
    last_round_id: int | None


def round_readiness(db: Database, actor: Actor, settings: Settings) -> Readiness:
    """How many reviewed answers wait for a round, against MEDVQA_ROUND_MIN_EXAMPLES."""
    from sqlalchemy import select

    from medvqa.db import TrainingRound

    authorize(db, actor, Action.ADAPTER_READ, "round")
    with db.read_session() as session:
        last = session.scalars(select(TrainingRound).order_by(TrainingRound.id.desc())).first()
        usable, _ = collect_candidates(session)
        newer, _ = collect_candidates(session, last.started_at) if last else (usable, None)
        return Readiness(len(usable), len(newer), settings.round_min_examples, last.id if last else None)


def jobs_dir(settings: Settings) -> Path:
    return settings.home / "jobs"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def process_running(pid: int | None) -> bool:
    """Whether the process exists and is not a zombie (ended, waiting to be reaped)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a finished child not yet reaped is a zombie: gone for our purpose
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _age_seconds(moment: str) -> float:
    try:
        return (datetime.now(UTC) - datetime.fromisoformat(moment)).total_seconds()
    except ValueError:
        return float("inf")


def _read(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return data
    except (OSError, ValueError):
        return {}


def _write_status(folder: Path, **changes: Any) -> None:
    status = {**_read(folder / "status.json"), **changes}
    scratch = folder / "status.json.tmp"
    scratch.write_text(json.dumps(status, indent=2), encoding="utf-8")
    os.replace(scratch, folder / "status.json")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        with path.open("rb") as stream:
            stream.seek(0, os.SEEK_END)
            stream.seek(max(0, stream.tell() - 16_384))
            text = stream.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    kept = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]  # bars redraw with \r
    return "\n".join(kept[-lines:])


def _progress(log_tail: str) -> float | None:
    found = _PROGRESS.findall(log_tail)
    if not found:
        return None
    done, total = (int(v) for v in found[-1])
    return min(1.0, done / total) if total else None


def _job(folder: Path) -> RoundJob:
    spec, status = _read(folder / "spec.json"), _read(folder / "status.json")
    state = status.get("state", RUNNING)
    starting = status.get("pid") is None and _age_seconds(str(spec.get("started_at", ""))) < 60
    if state == RUNNING and not starting and not process_running(status.get("pid")):  # died without writing its end
        _write_status(folder, state=FAILED, finished_at=_now(), error="the job's process ended without a result")
        status = _read(folder / "status.json")
        state = FAILED
        _release(folder)
    tail = _tail(folder / "log.txt")
    return RoundJob(
        name=folder.name,
        state=state,
        started_by=str(spec.get("actor", {}).get("name", "?")),
        started_at=str(spec.get("started_at", "")),
        finished_at=status.get("finished_at"),
        pid=status.get("pid"),
        round_id=status.get("round_id"),
        gate_passed=status.get("gate_passed"),
        error=status.get("error"),
        progress=1.0 if state == FINISHED else _progress(tail),
        log_tail=tail,
    )


def latest_job(db: Database, actor: Actor, settings: Settings) -> RoundJob | None:
    """The newest round job (running or not), as its files say now."""
    authorize(db, actor, Action.ADAPTER_READ, "round")
    folders = sorted(jobs_dir(settings).glob("round-*"))
    return _job(folders[-1]) if folders else None


def _take_lock(root: Path, name: str) -> None:
    """One job at a time: create the lock exclusively; take over a stale one (its job is no longer running)."""
    lock = root / LOCK
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            holder = lock.read_text(encoding="utf-8").strip() if lock.exists() else ""
            if holder and (root / holder).is_dir() and _job(root / holder).state == RUNNING:
                raise InvalidInput(f"a round is already running (job {holder}); wait for it or cancel it") from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(name)
        return
    raise InvalidInput("another round started at the same moment; look again")


def _release(folder: Path) -> None:
    lock = folder.parent / LOCK
    try:
        if lock.read_text(encoding="utf-8").strip() == folder.name:
            lock.unlink()
    except OSError:
        pass


def start_round_job(db: Database, actor: Actor, settings: Settings, options: JobOptions) -> RoundJob:
    """Start a round in a background process; refused while another runs. The round itself checks the rest
    (locked test set, enough reviewed answers, no leak) and its refusal shows in the job's state."""
    authorize(db, actor, Action.ROUND_RUN, "round")
    root = jobs_dir(settings)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = "round-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    _take_lock(root, name)
    folder = root / name
    try:
        folder.mkdir(mode=0o700)
        spec = {"actor": asdict(actor), "options": asdict(options), "started_at": _now()}
        (folder / "spec.json").write_text(json.dumps(spec, indent=2), encoding="utf-8")
        _write_status(folder, state=RUNNING, pid=None)  # no pid yet: "starting" for a minute at most
        with (folder / "log.txt").open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "medvqa.services.round_jobs", str(folder)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: cancel stops it and whatever it started
            )
        _write_status(folder, pid=process.pid)
    except OSError as exc:
        _release(folder)
        raise MedVQAError(f"cannot start the round's process: {exc}") from None
    details = {"job": name, "options": asdict(options)}
    write(db, lambda s: audit.record(s, actor, Action.ROUND_JOB_START, "round", None, details=details))
    return _job(folder)


def cancel_round_job(db: Database, actor: Actor, settings: Settings, name: str) -> RoundJob:
    """Stop a running job (its whole process group); the round it was making is not registered."""
    authorize(db, actor, Action.ROUND_JOB_CANCEL, "round")
    folder = jobs_dir(settings) / name
    if not name.startswith("round-") or "/" in name or not folder.is_dir():
        raise NotFound(f"no round job {name!r}")
    job = _job(folder)
    if job.state != RUNNING:
        raise InvalidInput(f"round job {name} is not running ({job.state})")
    if job.pid:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGTERM)
    _write_status(folder, state=CANCELLED, finished_at=_now(), error=f"cancelled by {actor.name}")
    _release(folder)
    write(db, lambda s: audit.record(s, actor, Action.ROUND_JOB_CANCEL, "round", None, details={"job": name}))
    return _job(folder)


def _work(folder: Path) -> int:
    """The job's process: run the round as the person who started it; record how it ended."""
    from medvqa.config import load_settings
    from medvqa.services.database import open_database
    from medvqa.services.rounds import RoundOptions, run_round
    from medvqa.training.train import TrainSettings

    spec = _read(folder / "spec.json")
    actor = Actor(**spec["actor"])
    options = JobOptions(**spec["options"])

    def stop(_signum: int, _frame: Any) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, stop)
    try:
        settings = load_settings()
        train = TrainSettings(epochs=options.epochs, max_steps=options.max_steps)
        outcome = run_round(
            open_database(settings),
            actor,
            settings,
            RoundOptions(since_round=options.since_round, train=train),
            progress=True,
        )
    except MedVQAError as exc:
        print(f"medvqa: error: {exc}", flush=True)
        _write_status(folder, state=FAILED, finished_at=_now(), error=str(exc))
        return 1
    except SystemExit:
        print("cancelled", flush=True)
        return 143
    except Exception as exc:  # anything else: say so in the job; the traceback goes to its log
        import traceback

        traceback.print_exc()
        _write_status(folder, state=FAILED, finished_at=_now(), error=f"{type(exc).__name__}: {exc}"[:500])
        return 1
    finally:
        _release(folder)
    print(f"round {outcome.round_id}: gate {'passed' if outcome.gate_passed else 'failed'}", flush=True)
    _write_status(
        folder, state=FINISHED, finished_at=_now(), round_id=outcome.round_id, gate_passed=outcome.gate_passed
    )
    return 0


if __name__ == "__main__":
    sys.exit(_work(Path(sys.argv[1])))
