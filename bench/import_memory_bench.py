"""Memory benchmark: what refusing a bomb costs, against importing a normal file of about the same size on disk.

Each case runs in a fresh subprocess (a migrated SQLite database under a scratch MEDVQA_HOME, one small valid
import first so that modules and caches are loaded); its peak resident set is reset just before the import
(/proc/self/clear_refs) and read after it (VmHWM), and tracemalloc gives the peak of Python allocations.

    .venv/bin/python bench/import_memory_bench.py [--limit BYTES] [--code DIR]

--limit is MEDVQA_IMPORT_MAX_FILE_BYTES for every case (default: the shipped 1 GiB). --code runs the cases
against another checkout of medvqa (e.g. `git archive <commit> | tar -x -C DIR`), to compare before and after.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
CHILD = r"""
import json, os, resource, sys, time, tracemalloc
from pathlib import Path

home, path, warm = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
os.environ["MEDVQA_HOME"] = str(home)
from medvqa.config import load_settings
from medvqa.db.engine import Database
from medvqa.db.migrate import upgrade
from medvqa.services.audit import Actor
from medvqa.services.studies import import_paths

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)

settings = load_settings()
home.mkdir(parents=True, exist_ok=True)
db = Database.from_settings(settings)
upgrade(db)
actor = Actor("bench", "admin")
import_paths(db, actor, [warm], settings)
Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from here
before = status("VmRSS")
tracemalloc.start()
started = time.perf_counter()
report = import_paths(db, actor, [path], settings)
seconds = time.perf_counter() - started
python_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
[outcome] = [o for o in report.outcomes]
print(json.dumps({"before": before, "peak": status("VmHWM"), "python_peak": python_peak, "seconds": seconds,
                  "status": outcome.status, "reason": outcome.reason}))
"""


def dicom_file(pixels: np.ndarray, transfer_syntax: str = "1.2.840.10008.1.2.1") -> bytes:
    from pydicom import dcmwrite
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality, ds.BodyPartExamined = "Bench^Patient", "BENCH001", "CT", "HEAD"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def deflate_bomb(inflated: int) -> bytes:
    """A valid preamble and file meta declaring Deflated Explicit VR Little Endian, then `inflated` zeros deflated."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    data = dicom_file(np.zeros((4, 4)))
    from pydicom import dcmread

    meta = dcmread(io.BytesIO(data)).file_meta
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros, body = b"\x00" * (1 << 20), bytearray()
    for _ in range(inflated >> 20):
        body += compressor.compress(zeros)
    return buffer.getvalue() + bytes(body) + compressor.flush()


def zip_bomb(inflated: int) -> bytes:
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("bomb.dcm", "w", force_zip64=True) as member,
    ):
        zeros = b"\x00" * (1 << 20)
        for _ in range(inflated >> 20):
            member.write(zeros)
    return buffer.getvalue()


def png(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A grey PNG; without `rows`, zeros streamed through zlib (a decompression bomb) without holding the image."""
    import struct

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor = zlib.compressobj(9)
    data = bytearray()
    if rows is None:
        row = b"\x00" * (width + 1)
        step = max(1, (8 << 20) // len(row))
        for start in range(0, height, step):
            data += compressor.compress(row * min(step, height - start))
    else:
        data += compressor.compress(rows)
    data += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bytes(data)) + chunk(b"IEND", b"")


def normal_png(size: int, rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def build_cases(folder: Path, bomb_bytes: int) -> list[tuple[str, str, Path]]:
    """(case, the baseline it is compared with, file) in table order."""
    rng = np.random.default_rng(0)
    normal_pixels = rng.integers(0, 65535, (1024, 1024))  # 2 MiB that do not compress: like the bombs on disk
    files = {
        "normal DICOM": dicom_file(normal_pixels),
        "deflate bomb DICOM": deflate_bomb(bomb_bytes),
        "normal zip (one DICOM member)": b"",
        "zip bomb member": zip_bomb(bomb_bytes),
        "normal PNG": normal_png(1400, rng),
        "PNG bomb": png(45_000, 45_000),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("member.dcm", files["normal DICOM"])
    files["normal zip (one DICOM member)"] = buffer.getvalue()
    names = {"DICOM": ".dcm", "zip": ".zip", "PNG": ".png"}
    cases = []
    baseline = ""
    for case, data in files.items():
        suffix = next(ext for key, ext in names.items() if key in case)
        path = folder / (case.replace(" ", "-").replace("(", "").replace(")", "") + suffix)
        path.write_bytes(data)
        baseline = case if case.startswith("normal") else baseline
        cases.append((case, baseline, path))
    return cases


def run_case(path: Path, warm: Path, home: Path, limit: int | None, code: Path | None) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(code or HERE.parent), "HF_HUB_OFFLINE": "1"}
    env.pop("MEDVQA_DATABASE_URL", None)
    env.pop("MEDVQA_AUDIT_ANCHOR", None)
    if limit is not None:
        env["MEDVQA_IMPORT_MAX_FILE_BYTES"] = str(limit)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(home), str(path), str(warm)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=code or HERE.parent,
    )
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"status": "crashed", "reason": tail[:120], "before": 0, "peak": 0, "python_peak": 0, "seconds": 0.0}
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, help="MEDVQA_IMPORT_MAX_FILE_BYTES (default: the shipped 1 GiB)")
    parser.add_argument("--bomb-gib", type=float, default=2.0, help="what the deflate and zip bombs inflate to")
    parser.add_argument("--code", type=Path, help="another checkout of medvqa to measure instead of this one")
    args = parser.parse_args()
    mib = 1 << 20
    with tempfile.TemporaryDirectory(prefix="medvqa-memory-bench-") as scratch:
        folder = Path(scratch)
        cases = build_cases(folder, int(args.bomb_gib * 1024) * mib)
        warm = folder / "warm.dcm"
        warm.write_bytes(dicom_file(np.zeros((8, 8))))
        rows = []
        added: dict[str, float] = {}
        for index, (case, baseline, path) in enumerate(cases):
            result = run_case(path, warm, folder / f"home{index}", args.limit, args.code)
            grown = (int(result["peak"]) - int(result["before"])) / mib  # type: ignore[call-overload]
            added[case] = grown
            ratio = "1.00" if case == baseline else f"{grown / max(added[baseline], 0.1):.2f}"
            outcome = str(result["status"]) + (
                f": {str(result['reason'])[:60]}" if result["status"] != "imported" else ""
            )
            rows.append(
                f"| {case} | {path.stat().st_size / mib:.2f} | {outcome} | {int(result['before']) / mib:.0f} | "  # type: ignore[call-overload]
                f"{int(result['peak']) / mib:.0f} | {grown:.1f} | {int(result['python_peak']) / mib:.1f} | "  # type: ignore[call-overload]
                f"{ratio} | {float(result['seconds']):.2f} |"  # type: ignore[arg-type]
            )
    limit = args.limit or 1 << 30
    print(
        f"medvqa import memory, {platform.python_implementation()} {platform.python_version()}, "
        f"MEDVQA_IMPORT_MAX_FILE_BYTES={limit} ({limit / mib:.0f} MiB), code: {args.code or HERE.parent}"
    )
    print()
    print(
        "| case | file MiB | outcome | RSS before MiB | peak RSS MiB | added MiB | Python peak MiB | vs baseline | s |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
