"""The one way medvqa hashes a file: SHA-256, streamed (weights, adapters, data files, the locked test set)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks so that multi-GB weights fit in memory."""
    with Path(path).open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()
