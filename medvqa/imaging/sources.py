"""What `medvqa import PATH...` reads: files, folders (recursive), zip files and DICOMDIR indexes.

Every input becomes exactly one item: a Source (bytes read later, never past the size limit) or a Listed outcome
decided while listing (refused or skipped, with why). What a file is comes from its content, never its name or
its tail: a zip starts with a local file header at offset 0; a DICOM file has 'DICM' at offset 128 (and is a
DICOMDIR when its file meta says so). Nothing is followed or opened that could lead elsewhere or block:
- folder entries are listed without following links (os.scandir, lstat); a symbolic link leading outside the
  folder being imported is refused, one leading inside is skipped (its target is imported under its own name);
- FIFOs, sockets and devices are refused from their lstat, never opened (opening a FIFO blocks); files are opened
  with O_NOFOLLOW | O_NONBLOCK and checked to be regular files on the open descriptor;
- zip members are streamed with a counter and a hard cap, whatever sizes the archive declares; encrypted members,
  unsupported methods, names that climb out of the archive and zips inside zips are refused;
- a DICOMDIR's entries are resolved inside its own folder; an entry that climbs out of it (``..``, absolute,
  through a symbolic link) is refused without being read, and a listed file that is missing gets its own line.
Paths named on the command line are the person's own choice: a link given there is followed.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import struct
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from medvqa.errors import ImportRefused
from medvqa.imaging.reader import ImportLimits, check_declared_lengths, one_line, scrub_message

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

MAX_ZIP_RATIO = 200  # a member inflating more than this is treated as a zip bomb
READ_CHUNK = 1 << 20
HEAD_BYTES = 132
SNIFF_BYTES = 8 << 10  # enough for the preamble and any real file meta (a DICOMDIR's is a few hundred bytes)
ZIP_LOCAL_HEADER = b"PK\x03\x04"
ZIP_EMPTY = b"PK\x05\x06"  # an archive with no members starts with its end record
ZIP_SPANNED = b"PK\x07\x08"
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}  # bzip2/lzma: zipfile inflates them without a cap
ZIP_END_RECORD = ZIP_EMPTY
ZIP64_LOCATOR = b"PK\x06\x07"
CENTRAL_HEADER_BYTES = 46
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

Container = Literal["", "zip", "dicomdir"]


@dataclass(frozen=True)
class Source:
    """One input to read: `name` is what the person gave (a path, zip!member), shown in the report."""

    name: str
    size: int
    read: Callable[[int], bytes]  # read(limit) -> at most limit + 1 bytes, so an overrun is visible
    container: Container = ""  # where it came from: what it may not be (a zip inside a zip)


@dataclass(frozen=True)
class Listed:
    """One input whose outcome was decided while listing (nothing of it is read later)."""

    name: str
    status: Literal["refused", "skipped"]
    reason: str


Item = Source | Listed


@contextlib.contextmanager
def open_sources(paths: Sequence[Path], limits: ImportLimits) -> Iterator[list[Item]]:
    """One item per input under `paths`; refuses the whole import up front when there are too many, or when a
    path named on the command line does not exist. Zip archives stay readable until the block ends."""
    archives = _Archives()
    try:
        items: list[Item] = []
        for path in paths:
            if not os.path.lexists(path):
                raise ImportRefused(f"{one_line(str(path))}: no such file or folder")
        for path in paths:
            for item in _argument(path, limits, archives):
                items.append(item)
                if len(items) > limits.max_instances:
                    raise ImportRefused(
                        f"more than {limits.max_instances} files in one import (MEDVQA_IMPORT_MAX_INSTANCES): "
                        "import in parts"
                    )
        yield items
    finally:
        archives.close()


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


def is_zip(head: bytes) -> bool:
    return head[:4] in (ZIP_LOCAL_HEADER, ZIP_EMPTY, ZIP_SPANNED)


def is_dicom(head: bytes) -> bool:
    return len(head) >= HEAD_BYTES and head[128:132] == b"DICM"


# --- the command-line arguments, folders and their entries -------------------------------------------------------


def _argument(path: Path, limits: ImportLimits, archives: _Archives) -> Iterator[Item]:
    shown = one_line(str(path))
    try:
        real = Path(os.path.realpath(path))
        info = os.stat(real)
    except OSError as exc:
        yield Listed(shown, "refused", f"cannot be read: {_os_reason(exc)}")
        return
    if stat.S_ISDIR(info.st_mode):
        found = False
        for item in _walk(real, shown):
            found = True
            if isinstance(item, Listed):
                yield item
            else:
                entry, entry_shown = item
                yield from _guarded(entry_shown, partial(_file, entry, entry_shown, limits, archives))
        if not found:
            yield Listed(shown, "skipped", "the folder holds no files")
    elif stat.S_ISREG(info.st_mode):
        yield from _guarded(shown, partial(_file, real, shown, limits, archives, explicit=True))
    else:
        yield Listed(shown, "refused", f"{_kind(info.st_mode)} is not a file: not opened")


def _guarded(shown: str, expand: Callable[[], Iterator[Item]]) -> Iterator[Item]:
    """Whatever goes wrong while listing one input becomes that input's refusal (the items it gave stand)."""
    given = 0
    try:
        for item in expand():
            given += 1
            yield item
    except ImportRefused as exc:
        yield Listed(shown, "refused", one_line(str(exc)))
    except Exception as exc:
        if given == 0:
            yield Listed(shown, "refused", f"cannot be listed ({type(exc).__name__}): {scrub_message(exc)}")
        else:
            yield Listed(shown, "refused", f"listing stopped after {given} item(s) ({type(exc).__name__})")


def _walk(root: Path, shown_root: str) -> Iterator[Listed | tuple[Path, str]]:
    """Every entry below `root` (depth first, by name), without following links: regular files as (path, shown),
    everything else already decided. An explicit stack, so a deep tree cannot exhaust the recursion limit."""
    stack: list[tuple[Path, str]] = [(root, shown_root)]
    while stack:
        folder, shown = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as exc:
            yield Listed(shown, "refused", f"cannot list this folder: {_os_reason(exc)}")
            continue
        subfolders = []
        for entry in entries:
            entry_shown = one_line(os.path.join(shown, entry.name))
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError as exc:
                yield Listed(entry_shown, "refused", f"cannot be read: {_os_reason(exc)}")
                continue
            if stat.S_ISDIR(mode):
                subfolders.append((Path(entry.path), entry_shown))
            elif stat.S_ISLNK(mode):
                yield _symlink(Path(entry.path), root, entry_shown)
            elif stat.S_ISREG(mode):
                yield (Path(entry.path), entry_shown)
            else:
                yield Listed(entry_shown, "refused", f"{_kind(mode)} is not a file: not opened")
        stack.extend(reversed(subfolders))


def _symlink(path: Path, root: Path, shown: str) -> Listed:
    """A link inside an imported folder is never followed: its target is either outside (refused) or inside,
    where the walk reaches it under its own name."""
    target = Path(os.path.realpath(path))
    if not _inside(target, root):
        return Listed(shown, "refused", "symbolic link leading outside the imported folder: not followed")
    if not target.exists():
        return Listed(shown, "refused", "broken symbolic link")
    return Listed(shown, "skipped", "symbolic link to a place inside the imported folder: imported under its own name")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "a special file"


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


# --- one regular file: what is it? --------------------------------------------------------------------------------


def _open_regular(path: Path) -> tuple[int, os.stat_result]:
    """A descriptor of `path` that is certainly a regular file (not a link, FIFO or device swapped in)."""
    fd = os.open(path, OPEN_FLAGS)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImportRefused(f"{_kind(info.st_mode)} is not a file: not read")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def _read_head(path: Path) -> tuple[bytes, int]:
    try:
        fd, info = _open_regular(path)
    except OSError as exc:
        raise ImportRefused(f"cannot be read: {_os_reason(exc)}") from None
    with os.fdopen(fd, "rb") as handle:
        return handle.read(SNIFF_BYTES), info.st_size


def read_file(path: Path, limit: int) -> bytes:
    """At most limit + 1 bytes of a regular file, allocating no more than the file holds (one read, so no copy,
    unless the file is larger than one read returns or grew since its size was taken)."""
    try:
        fd, info = _open_regular(path)
    except OSError as exc:
        raise ImportRefused(f"cannot be read: {_os_reason(exc)}") from None
    with os.fdopen(fd, "rb", buffering=0) as handle:
        data = handle.read(min(info.st_size, limit) + 1) or b""
        if len(data) <= limit and (more := handle.read(min(READ_CHUNK, limit + 1 - len(data)))):
            parts = [data, more]
            total = len(data) + len(more)
            while total <= limit and (part := handle.read(min(READ_CHUNK, limit + 1 - total))):
                parts.append(part)
                total += len(part)
            data = b"".join(parts)
    return data


def _file(path: Path, shown: str, limits: ImportLimits, archives: _Archives, explicit: bool = False) -> Iterator[Item]:
    head, size = _read_head(path)
    if is_zip(head) and is_dicom(head):
        yield Listed(shown, "refused", "both a zip archive (offset 0) and a DICOM file (offset 128): ambiguous")
    elif is_zip(head):
        yield from _zip(path, shown, size, limits, archives)
    elif is_dicom(head) and _is_dicomdir(head):
        yield from _dicomdir(path, shown, limits) if explicit else _dicomdir_in_folder(path, shown, limits)
    else:
        yield Source(shown, size, partial(read_file, path))


# --- zip archives ----------------------------------------------------------------------------------------------------


class _Archives:
    """Open zip archives, one at a time (members are read in listing order, so one stays open while they are)."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._archive: zipfile.ZipFile | None = None

    def get(self, path: Path) -> zipfile.ZipFile:
        if self._path != path or self._archive is None:
            self.close()
            fd, _ = _open_regular(path)
            handle = os.fdopen(fd, "rb")
            try:
                self._archive = zipfile.ZipFile(handle)
            except BaseException:
                handle.close()
                raise
            self._path = path
        return self._archive

    def close(self) -> None:
        if self._archive is not None:
            fp = self._archive.fp
            self._archive.close()
            if fp is not None:
                fp.close()
        self._archive, self._path = None, None


def _zip(path: Path, shown: str, size: int, limits: ImportLimits, archives: _Archives) -> Iterator[Item]:
    _check_central_directory(path, size, limits)
    try:
        infos = archives.get(path).infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise ImportRefused(f"unreadable zip archive: {scrub_message(exc)}") from None
    members = [info for info in infos if not info.is_dir()]
    if len(members) > limits.max_instances:
        raise ImportRefused(f"the zip archive holds {len(members)} members, more than MEDVQA_IMPORT_MAX_INSTANCES")
    if not members:
        yield Listed(shown, "skipped", "the zip archive holds no files")
        return
    for info in members:
        member_shown = one_line(f"{shown}!{info.filename}")
        problem = _member_problem(info)
        if problem:
            yield Listed(member_shown, "refused", problem)
        else:
            yield Source(member_shown, info.file_size, partial(_read_member, archives, path, info), container="zip")


def _check_central_directory(path: Path, size: int, limits: ImportLimits) -> None:
    """Count the central directory's headers before zipfile builds an object per member (46 bytes each on disk,
    hundreds in memory): an archive with absurdly many members, or a directory far larger than that many members
    need, is refused unopened, whatever its end record claims."""
    tail_size = min(size, 22 + 0xFFFF)
    tail = _read_at(path, size - tail_size, tail_size)
    at = tail.rfind(ZIP_END_RECORD)
    if at < 0 or len(tail) - at < 22:
        raise ImportRefused("unreadable zip archive: no end of central directory record (a broken or cut archive)")
    (directory_size,) = struct.unpack("<I", tail[at + 12 : at + 16])
    end = size - tail_size + at
    locator = tail.rfind(ZIP64_LOCATOR, 0, at)
    if locator >= 0 and at - locator == 20:
        end, directory_size = _zip64_directory(tail, locator, size - tail_size)
    budget = 2 * limits.max_instances + 16
    if directory_size > budget * (CENTRAL_HEADER_BYTES + 1024):
        raise ImportRefused(
            f"the zip archive's central directory ({directory_size} bytes) is far too large: not opened"
        )
    start = end - directory_size
    if start < 0:
        raise ImportRefused("unreadable zip archive: the central directory lies before the start of the file")
    directory = _read_at(path, start, directory_size)
    count, offset = 0, 0
    while offset + CENTRAL_HEADER_BYTES <= len(directory) and directory[offset : offset + 4] == b"PK\x01\x02":
        name, extra, comment = struct.unpack("<HHH", directory[offset + 28 : offset + 34])
        offset += CENTRAL_HEADER_BYTES + name + extra + comment
        count += 1
        if count > budget:
            raise ImportRefused(
                f"the zip archive holds more than {budget} entries (MEDVQA_IMPORT_MAX_INSTANCES is "
                f"{limits.max_instances}): not opened"
            )


def _read_at(path: Path, offset: int, length: int) -> bytes:
    try:
        fd, _ = _open_regular(path)
        with os.fdopen(fd, "rb") as handle:
            handle.seek(max(offset, 0))
            return handle.read(length)
    except OSError as exc:
        raise ImportRefused(f"cannot be read: {_os_reason(exc)}") from None


def _zip64_directory(tail: bytes, locator: int, tail_offset: int) -> tuple[int, int]:
    """(where the central directory ends, its size) from the zip64 end record just before the locator (where
    zipfile reads it too)."""
    relative = locator - 56
    if relative >= 0 and tail[relative : relative + 4] == b"PK\x06\x06":
        (directory_size,) = struct.unpack("<Q", tail[relative + 40 : relative + 48])
        return tail_offset + relative, int(directory_size)
    raise ImportRefused("unreadable zip archive: a broken zip64 end of central directory record")


def _member_problem(info: zipfile.ZipInfo) -> str:
    name = info.filename
    parts = name.replace("\\", "/").split("/")
    if "\x00" in name or name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
        return "member name leads outside the archive (path traversal): not read"
    if info.flag_bits & 0x1:
        return "encrypted zip member: not read (unpack it with its password first)"
    if info.compress_type not in ZIP_METHODS:
        return f"zip compression method {info.compress_type} is not supported (stored or deflate only)"
    if info.compress_size and info.file_size / info.compress_size > MAX_ZIP_RATIO:
        return f"zip member inflates {info.file_size // info.compress_size}x (a zip bomb?)"
    return ""


def _read_member(archives: _Archives, path: Path, info: zipfile.ZipInfo, limit: int) -> bytes:
    """The member's bytes, streamed in chunks and counted: whatever the archive declares, no more than
    limit + one chunk is ever held, and a member inflating past the limit or the ratio is refused."""
    ceiling = MAX_ZIP_RATIO * max(info.compress_size, 1) + READ_CHUNK
    buffer = io.BytesIO()
    total = 0
    try:
        with archives.get(path).open(info) as member:
            while chunk := member.read(READ_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise ImportRefused(
                        f"zip member inflates beyond {limit} bytes (MEDVQA_IMPORT_MAX_FILE_BYTES; a zip bomb?)"
                    )
                if total > ceiling:
                    raise ImportRefused(f"zip member inflates more than {MAX_ZIP_RATIO}x (a zip bomb?)")
                buffer.write(chunk)
    except ImportRefused:
        raise
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise ImportRefused(f"unreadable zip member: {scrub_message(exc)}") from None
    except Exception as exc:  # a corrupt deflate stream raises zlib.error, and decoders raise what they like
        raise ImportRefused(f"unreadable zip member ({type(exc).__name__}): {scrub_message(exc)}") from None
    return buffer.getvalue()


# --- DICOMDIR ---------------------------------------------------------------------------------------------------------


def _is_dicomdir(head: bytes) -> bool:
    """Whether the file meta (in the first bytes of the file) names the Media Storage Directory SOP class."""
    from pydicom.filereader import _read_file_meta_info

    try:
        buffer = io.BytesIO(head)
        buffer.seek(HEAD_BYTES)
        meta = _read_file_meta_info(buffer)
        return str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY
    except Exception:  # unreadable (or absurdly long) meta: the reader refuses the file with its reason
        return False


def _dicomdir(path: Path, shown: str, limits: ImportLimits) -> Iterator[Item]:
    """One item per file the DICOMDIR lists, each resolved inside the DICOMDIR's folder."""
    listed = _dicomdir_file_ids(path, limits)
    if not listed:
        yield Listed(shown, "skipped", "the DICOMDIR lists no files")
        return
    folder = path.parent
    shown_folder = os.path.dirname(shown)
    for parts in listed:
        entry_shown = one_line(f"{shown_folder}/{'/'.join(parts)}" if parts else f"{shown}!(empty file ID)")
        yield _dicomdir_entry(folder, parts, entry_shown)


def _dicomdir_in_folder(path: Path, shown: str, limits: ImportLimits) -> Iterator[Item]:
    """A DICOMDIR met while walking a folder: the folder's files are imported as they are, so the index itself is
    skipped; but one that points outside its folder, or at files that are missing, is refused (hostile, or an
    incomplete copy of a disc), with its entries counted in one line."""
    folder = path.parent
    outcomes = [_dicomdir_entry(folder, parts, "") for parts in _dicomdir_file_ids(path, limits)]
    problems = [outcome.reason for outcome in outcomes if isinstance(outcome, Listed)]
    if not problems:
        yield Listed(shown, "skipped", f"DICOMDIR index of {len(outcomes)} file(s): they are imported from the folder")
        return
    outside = sum("outside" in reason for reason in problems)
    missing = sum("missing" in reason for reason in problems)
    other = len(problems) - outside - missing
    counts = [
        f"{n} {what}" for n, what in ((outside, "outside its folder"), (missing, "missing"), (other, "unreadable"))
    ]
    yield Listed(
        shown,
        "refused",
        f"DICOMDIR lists file(s) {', '.join(c for c in counts if not c.startswith('0 '))}: none of them read "
        "(the files in the folder are imported as they are)",
    )


def _dicomdir_file_ids(path: Path, limits: ImportLimits) -> list[list[str]]:
    """The ReferencedFileID components of every record that names a file; refused when unreadable or huge."""
    from pydicom import dcmread

    data = read_file(path, limits.max_file_bytes)
    if len(data) > limits.max_file_bytes:
        raise ImportRefused(f"more than {limits.max_file_bytes} bytes (MEDVQA_IMPORT_MAX_FILE_BYTES)")
    try:
        index = dcmread(io.BytesIO(data))
        if "DirectoryRecordSequence" not in index:
            raise ImportRefused("the DICOMDIR holds no directory records (cut short, or not a DICOMDIR)")
        check_declared_lengths(index)  # a DICOMDIR cut short would otherwise list only its first records
        last = index.get("OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity")
        if isinstance(last, int) and last >= len(data):
            raise ImportRefused("the DICOMDIR is cut short: its last directory record lies past its end")
        records = list(index.DirectoryRecordSequence or [])
        file_ids = [_file_id(record) for record in records]
    except ImportRefused:
        raise
    except RecursionError:
        raise ImportRefused("unreadable DICOMDIR: nested too deeply") from None
    except Exception as exc:
        raise ImportRefused(f"unreadable DICOMDIR ({type(exc).__name__}): {scrub_message(exc)}") from None
    listed = [parts for parts in file_ids if parts is not None]
    if len(listed) > limits.max_instances:
        raise ImportRefused(f"the DICOMDIR lists {len(listed)} files, more than MEDVQA_IMPORT_MAX_INSTANCES")
    return listed


def _file_id(record: Dataset) -> list[str] | None:
    """The components of a record's ReferencedFileID, or None when the record names no file."""
    if "ReferencedFileID" not in record:
        return None
    value = record.get("ReferencedFileID")
    if value is None or value == "":
        return []  # present but empty: an entry naming no file, refused with its own line
    values = [value] if isinstance(value, str | bytes) else list(value)
    return [item.decode("latin-1") if isinstance(item, bytes) else str(item) for item in values]


def _dicomdir_entry(folder: Path, parts: list[str], shown: str) -> Item:
    if not parts:
        return Listed(shown, "refused", "DICOMDIR entry with an empty file ID: names no file")
    if any(part in ("", ".", "..") or "/" in part or "\\" in part or "\x00" in part or ":" in part for part in parts):
        return Listed(shown, "refused", "DICOMDIR entry leads outside its folder: not read")
    candidate = _case_insensitive(folder, parts)
    real = Path(os.path.realpath(candidate))
    if not _inside(real, folder):
        return Listed(shown, "refused", "DICOMDIR entry leads outside its folder (symbolic link): not read")
    try:
        info = os.lstat(real)
    except FileNotFoundError:
        return Listed(shown, "refused", "listed in the DICOMDIR but missing")
    except OSError as exc:
        return Listed(shown, "refused", f"cannot be read: {_os_reason(exc)}")
    if not stat.S_ISREG(info.st_mode):
        return Listed(shown, "refused", f"{_kind(info.st_mode)} is not a file: not opened")
    return Source(shown, info.st_size, partial(read_file, real), container="dicomdir")


def _case_insensitive(folder: Path, parts: list[str]) -> Path:
    """DICOMDIR file IDs are upper case, and discs are often copied with lower-case names: match either."""
    current = folder
    for part in parts:
        exact = current / part
        if os.path.lexists(exact):
            current = exact
            continue
        try:
            names = {name.upper(): name for name in os.listdir(current)}
        except OSError:
            return folder.joinpath(*parts)
        if part.upper() not in names:
            return folder.joinpath(*parts)
        current = current / names[part.upper()]
    return current
