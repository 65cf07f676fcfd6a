"""Content-addressed storage of de-identified instances: the same bytes are stored once.

Files are written before the database rows that reference them (a row must never point at a missing file), so
a failed or killed import can leave files that no row references. Three things keep the store clean:
- the store remembers which files it created (`created`), and the import removes those its database writes did
  not end up referencing;
- every import holds the store lock shared; whoever removes files holds it exclusively, so a file another running
  import has just stored (and is about to reference) is never removed under it;
- an import leaves a marker in the store while it runs; the next import that finds a marker no running import
  owns (it can take the lock exclusively) sweeps the store: unreferenced files, temporary files, stale markers;
- `medvqa store check --prune` finds and removes the same on demand.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from medvqa.errors import MedVQAError

LOCK_NAME = ".lock"
TEMPORARY_PREFIX = ".incoming-"
MARKER_PREFIX = ".import-"  # one per running import; left behind only by an import that was killed
CONTENT_NAME = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{64}\.dcm$")


class StoreError(MedVQAError):
    """The store as a whole cannot be used (not creatable, not lockable, busy)."""


class ContentStore:
    """Files named by the SHA-256 of their content, under root/ab/cd/<sha256>.dcm."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.created: set[str] = set()  # relative paths this object wrote (not those it found already there)

    def put(self, data: bytes) -> str:
        """Store `data` atomically unless already there; return its path relative to the root.

        Not yet durable: call `sync()` before the database records the file (one flush per batch costs far
        less than an fsync per file, and a crash before it leaves only unreferenced files behind)."""
        digest = hashlib.sha256(data).hexdigest()
        relative = f"{digest[:2]}/{digest[2:4]}/{digest}.dcm"
        target = self.root / relative
        if target.exists():
            return relative
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=TEMPORARY_PREFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self.created.add(relative)
        return relative

    def sync(self) -> None:
        """Make every file written so far durable (file data, then their directory entries)."""
        os.sync()

    def path(self, relative: str) -> Path:
        return self.root / relative

    @contextlib.contextmanager
    def lock(self, *, exclusive: bool = False, wait_s: float | None = None) -> Iterator[StoreLock]:
        """Hold the store lock: shared for importing, exclusive for removing files. `wait_s` None waits as long
        as it takes; otherwise a StoreError after that many seconds. The kernel drops the lock of a killed
        process, so a crash never leaves the store locked."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot use the store at {self.root}: {exc.strerror or exc}") from None
        try:
            _flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, wait_s)
            yield StoreLock(fd)
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    @contextlib.contextmanager
    def import_marker(self) -> Iterator[ImportMarker]:
        """A marker file for the duration of an import (call with the lock held shared; it is removed before the
        lock is released, so a marker found under the exclusive lock belongs to an import that was killed, or
        to one that had to leave unreferenced files behind and kept it so that the next import sweeps)."""
        marker = ImportMarker(self.root / f"{MARKER_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(marker.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        try:
            yield marker
        finally:
            if not marker.keep:
                marker.path.unlink(missing_ok=True)

    def has_markers(self) -> bool:
        return self.root.is_dir() and any(self.root.glob(f"{MARKER_PREFIX}*"))

    def remove_unreferenced(self, candidates: set[str], referenced: set[str]) -> list[str]:
        """Remove the candidate files no row references; call with the lock held exclusively."""
        removed = []
        for relative in sorted(candidates - referenced):
            if not CONTENT_NAME.match(relative):
                continue
            try:
                self.path(relative).unlink()
            except FileNotFoundError:
                continue
            removed.append(relative)
            self._remove_empty_parents(self.path(relative).parent)
        return removed

    def remove_leftover(self, relative: str) -> None:
        """Remove a temporary file a killed writer left behind."""
        path = self.path(relative)
        path.unlink(missing_ok=True)
        self._remove_empty_parents(path.parent)

    def scan(self) -> tuple[set[str], set[str], set[str]]:
        """(content files, temporary files left by a killed writer, anything else) as paths relative to the
        root; nothing is followed or opened."""
        content: set[str] = set()
        leftovers: set[str] = set()
        foreign: set[str] = set()
        if not self.root.is_dir():
            return content, leftovers, foreign
        for folder, dirnames, filenames in os.walk(self.root, followlinks=False):
            base = Path(folder).relative_to(self.root)
            names = filenames + [d for d in dirnames if (Path(folder) / d).is_symlink()]
            for name in names:
                relative = (base / name).as_posix()
                if relative == LOCK_NAME:
                    continue
                if name.startswith(TEMPORARY_PREFIX) or (relative.startswith(MARKER_PREFIX) and "/" not in relative):
                    leftovers.add(relative)
                elif CONTENT_NAME.match(relative) and not (Path(folder) / name).is_symlink():
                    content.add(relative)
                else:
                    foreign.add(relative)
        return content, leftovers, foreign

    def _remove_empty_parents(self, folder: Path) -> None:
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent


class ImportMarker:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.keep = False  # set when unreferenced files stay behind: the next import sweeps them


class StoreLock:
    """The held store lock; `try_exclusive` turns a shared hold into an exclusive one when nobody else holds it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def try_exclusive(self) -> bool:
        """Exclusive now, or False (still shared: Linux drops the shared lock while converting, so a failed
        conversion takes it again, waiting for any exclusive holder)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                fcntl.flock(self._fd, fcntl.LOCK_SH)
                return False
            raise
        return True

    def share(self) -> None:
        """Back from exclusive to shared."""
        fcntl.flock(self._fd, fcntl.LOCK_SH)


def _flock(fd: int, operation: int, wait_s: float | None) -> None:
    if wait_s is None:
        fcntl.flock(fd, operation)
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            raise StoreError("the store is in use by an import; try again when it has finished")
        time.sleep(0.1)
