"""Content-addressed storage of de-identified instances: the same bytes are stored once."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


class ContentStore:
    """Files named by the SHA-256 of their content, under root/ab/cd/<sha256>.dcm."""

    def __init__(self, root: Path) -> None:
        self.root = root

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
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return relative

    def sync(self) -> None:
        """Make every file written so far durable (file data, then their directory entries)."""
        os.sync()

    def path(self, relative: str) -> Path:
        return self.root / relative
