"""Write a checkpoint folder all at once: into a hidden sibling first, then one rename.

An interrupted conversion or build (crash, Ctrl-C, full disk) must never leave a folder that looks like a
checkpoint but lacks weights: loaders would pick it up and fail later, far from the cause.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from medvqa.errors import ModelBuildError


def write_folder_atomically(target: Path, write: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> Path:
    """Run `write(staging)` into a fresh sibling of `target`, then rename it to `target`.

    If `target` already passes `is_complete`, nothing is written. If another process finished the same folder
    first, its result is kept and ours discarded. A `target` that exists but is incomplete was not made here
    (we only ever rename finished folders), so it is refused rather than deleted.
    """
    if is_complete(target):
        return target
    if target.exists():
        raise ModelBuildError(f"{target} exists but is not a complete checkpoint; move it away and run again.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        write(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not is_complete(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
