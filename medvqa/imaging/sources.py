"""What `medvqa import PATH...` reads: files, folders (recursive), zip files, and DICOMDIR indexes,
each as a Source whose bytes are read only when needed and never past the size limit."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from medvqa.errors import ImportRefused
from medvqa.imaging.reader import ImportLimits

MAX_ZIP_RATIO = 200  # a member inflating more than this is treated as a zip bomb


@dataclass(frozen=True)
class Source:
    """One file to import: `name` is what the person gave (a path, or zip!member), shown in the report."""

    name: str
    size: int
    read: Callable[[int], bytes]  # read(limit) -> at most limit + 1 bytes, so an overrun is visible


def list_sources(paths: Sequence[Path], limits: ImportLimits) -> list[Source]:
    """Every file under `paths`; refuses the whole import up front when there are too many."""
    sources: list[Source] = []
    for path in paths:
        if not path.exists():
            raise ImportRefused(f"{path}: no such file or folder")
        sources.extend(_expand(path))
        if len(sources) > limits.max_instances:
            raise ImportRefused(
                f"more than {limits.max_instances} files in one import (MEDVQA_IMPORT_MAX_INSTANCES): import in parts"
            )
    return sources


def read_bounded(source: Source, limits: ImportLimits) -> bytes:
    """The source's bytes, refused before reading when it declares too many, and while reading when it lies."""
    if source.size > limits.max_file_bytes:
        raise ImportRefused(
            f"{source.size} bytes exceed the limit of {limits.max_file_bytes} (MEDVQA_IMPORT_MAX_FILE_BYTES)"
        )
    data = source.read(limits.max_file_bytes)
    if len(data) > limits.max_file_bytes:
        raise ImportRefused(f"more than {limits.max_file_bytes} bytes (MEDVQA_IMPORT_MAX_FILE_BYTES)")
    return data


def _expand(path: Path) -> Iterator[Source]:
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            yield from _expand_file(child)
    else:
        yield from _expand_file(path, explicit=True)


def _expand_file(path: Path, explicit: bool = False) -> Iterator[Source]:
    if path.name.upper() == "DICOMDIR" and explicit:
        yield from _dicomdir_members(path)
    elif zipfile.is_zipfile(path):
        yield from _zip_members(path)
    else:
        yield Source(str(path), path.stat().st_size, partial(_read_file, path))


def _read_file(path: Path, limit: int) -> bytes:
    with path.open("rb") as handle:
        return handle.read(limit + 1)


def _zip_members(path: Path) -> Iterator[Source]:
    with zipfile.ZipFile(path) as archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
    for info in members:
        yield Source(f"{path}!{info.filename}", info.file_size, partial(_read_member, path, info))


def _read_member(path: Path, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.compress_size and info.file_size / info.compress_size > MAX_ZIP_RATIO:
        raise ImportRefused(f"zip member inflates {info.file_size // info.compress_size}x (a zip bomb?)")
    try:
        with zipfile.ZipFile(path) as archive, archive.open(info) as member:
            return member.read(limit + 1)
    except (zipfile.BadZipFile, NotImplementedError, OSError) as exc:
        raise ImportRefused(f"unreadable zip member: {exc}") from None


def _dicomdir_members(path: Path) -> Iterator[Source]:
    """The instances a DICOMDIR lists, resolved relative to its folder."""
    from pydicom.errors import InvalidDicomError
    from pydicom.fileset import FileSet

    try:
        fileset = FileSet(path)
    except (InvalidDicomError, ValueError, KeyError, AttributeError) as exc:
        raise ImportRefused(f"{path}: unreadable DICOMDIR ({type(exc).__name__})") from None
    for instance in fileset:
        member = Path(instance.path)
        if member.is_file():
            yield Source(str(member), member.stat().st_size, partial(_read_file, member))
