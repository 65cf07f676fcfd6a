"""Import benchmark: a synthetic 300-slice 512x512 CT series, uncompressed and JPEG 2000 (lossless), through
the whole `medvqa import` path (read, check, decode, burned-in text check, de-identify, render check, store,
database + audit), side by side with the floor: a bare loop of pydicom dcmread + pixel_array over the same files,
in the same process. Each series is imported in one process and with worker processes (MEDVQA_IMPORT_WORKERS),
once as scanners that declare BurnedInAnnotation NO write it (no OCR) and once without it (every slice is read
for text, as the de-identification policy requires).

    .venv/bin/python bench/import_bench.py [--slices 300] [--size 512] [--workers N] [--ocr-slices 60]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from medvqa.config import load_settings
from medvqa.db.engine import Database
from medvqa.db.migrate import upgrade
from medvqa.services.audit import Actor
from medvqa.services.studies import import_paths

OPERATOR = Actor("bench", "admin")


def phantom(index: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A head-sized disc of soft tissue (40 HU) with a bone ring, in air, plus noise: stored values + 1024."""
    y, x = np.mgrid[:size, :size] - size / 2
    radius = np.hypot(x, y) / (size / 2)
    hu = np.where(radius < 0.8, 40.0, -1000.0)
    hu = np.where((radius > 0.72) & (radius < 0.8), 900.0 + 20 * np.sin(index / 10), hu)
    return (hu + rng.normal(0, 12, hu.shape) + 1024).clip(0, 4095).astype(np.uint16)


def ct_slice(index: int, size: int, study: str, series: str, rng: np.random.Generator) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, study + ".1"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Patient", "BENCH001", "19600101", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber, ds.StudyID, ds.InstitutionName = "ACC1", "1", "Bench Hospital"
    ds.ReferringPhysicianName, ds.Manufacturer, ds.StationName = "Ref^Doc", "Bench", "CT01"
    ds.Modality, ds.BodyPartExamined, ds.SeriesNumber, ds.InstanceNumber = "CT", "HEAD", 1, index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, index * 1.0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness, ds.KVP = [0.5, 0.5], 1.0, 120
    ds.WindowCenter, ds.WindowWidth, ds.RescaleIntercept, ds.RescaleSlope = 40, 80, -1024, 1
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = phantom(index, size, rng).tobytes()
    return ds


def write_series(folder: Path, slices: int, size: int, compress: bool, declared_no: bool = True) -> int:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    study, series = generate_uid(), generate_uid()
    total = 0
    for index in range(slices):
        ds = ct_slice(index, size, study, series, rng)
        if declared_no:
            ds.BurnedInAnnotation = "NO"
        if compress:
            ds.compress(JPEG2000Lossless)
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def bare_loop(folder: Path) -> float:
    start = time.perf_counter()
    for path in sorted(folder.iterdir()):
        _ = pydicom.dcmread(path).pixel_array
    return time.perf_counter() - start


def medvqa_import(folder: Path, home: Path, workers: int) -> float:
    settings = load_settings(home=home, database_url=f"sqlite:///{home / 'bench.db'}", import_workers=workers)
    home.mkdir(parents=True, exist_ok=True)
    database = Database.from_settings(settings)
    upgrade(database)
    start = time.perf_counter()
    report = import_paths(database, OPERATOR, [folder], settings)
    elapsed = time.perf_counter() - start
    assert report.count("imported") == len(list(folder.iterdir())), report.as_dict()["files"][:3]
    database.dispose()
    return elapsed


def step_breakdown(folder: Path) -> dict[str, float]:
    """Milliseconds per file for each step of the import path, against the bare loop, in one pass."""
    import hashlib
    import io
    import os

    from compliance.deid import Deidentifier, DeidSettings
    from medvqa.imaging.burned_in import TextDetector
    from medvqa.imaging.importer import _encode, burned_in_check, hash_pixels
    from medvqa.imaging.pixel_data import clean_pixel_data
    from medvqa.imaging.reader import ImportLimits, capture_decoded, decode_pixels, read_dicom
    from medvqa.imaging.render_check import check_renders

    deid, limits = Deidentifier(DeidSettings(b"bench key 32 bytes long.........")), ImportLimits()
    detector = TextDetector(None)  # no cache: every slice is read, as on a first import
    steps = dict.fromkeys(
        [
            "bare dcmread+pixel_array",
            "read+checks",
            "decode",
            "pixel hash",
            "burned-in text (OCR)",
            "de-identify",
            "clean pixel data",
            "encode",
            "render check",
            "content hash",
            "write (page cache)",
        ],
        0.0,
    )
    files = sorted(folder.iterdir())
    scratch = folder.parent / "breakdown.tmp"
    for path in files:
        data = path.read_bytes()
        marks = [time.perf_counter()]
        _ = pydicom.dcmread(io.BytesIO(data)).pixel_array
        marks.append(time.perf_counter())
        ds = read_dicom(data, limits)
        marks.append(time.perf_counter())
        with capture_decoded() as decoded:
            pixels = decode_pixels(ds)
            marks.append(time.perf_counter())
            pixel_hash = hash_pixels(pixels)
            marks.append(time.perf_counter())
            burned_in_check(ds, pixels, pixel_hash, detector)
            marks.append(time.perf_counter())
            deid.deidentify_with_report(ds)
            marks.append(time.perf_counter())
            clean_pixel_data(ds, pixels)
        marks.append(time.perf_counter())
        encoded = _encode(ds)
        marks.append(time.perf_counter())
        check_renders(encoded, decoded)
        marks.append(time.perf_counter())
        hashlib.sha256(encoded).hexdigest()
        marks.append(time.perf_counter())
        scratch.write_bytes(encoded)
        marks.append(time.perf_counter())
        for name, start, end in zip(steps, marks, marks[1:], strict=False):
            steps[name] += (end - start) * 1000 / len(files)
    os.unlink(scratch)
    return steps


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Worker processes to compare with 1.")
    parser.add_argument("--ocr-slices", type=int, default=60, help="Slices of the series read for text (0: skip).")
    args = parser.parse_args()
    rows = []
    breakdown: dict[str, float] = {}
    series = [
        ("uncompressed, BurnedInAnnotation NO", False, True, args.slices),
        ("JPEG 2000 lossless, BurnedInAnnotation NO", True, True, args.slices),
    ]
    if args.ocr_slices:
        series.append(("uncompressed, BurnedInAnnotation absent (OCR)", False, False, args.ocr_slices))
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for number, (label, compress, declared_no, slices) in enumerate(series):
            folder = root / f"series-{number}"
            size_bytes = write_series(folder, slices, args.size, compress, declared_no)
            bare_loop(folder)  # warm the page cache and pydicom's plugin lookup for both contenders
            floor = min(bare_loop(folder) for _ in range(2))
            for workers in sorted({1, args.workers}):
                ours = medvqa_import(folder, root / f"home-{number}-{workers}", workers)
                rows.append((label, workers, slices, size_bytes / 1e6, floor, ours))
            if number == 0:
                breakdown = step_breakdown(folder)
    versions = f"Python {platform.python_version()}, pydicom {pydicom.__version__}, {os.cpu_count()} CPU cores"
    print(f"\n{args.size}x{args.size} CT, {versions}\n")
    print("| series | workers | files | MB | bare dcmread+pixel_array s | medvqa import s | MB/s | import / bare |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, workers, count, megabytes, floor, ours in rows:
        print(
            f"| {label} | {workers} | {count} | {megabytes:.1f} | {floor:.2f} | {ours:.2f} | "
            f"{megabytes / ours:.1f} | {ours / floor:.2f} |"
        )

    print("\nPer file, uncompressed series, in one process (ms):\n")
    print("| step | ms per file |\n|---|---:|")
    for name, milliseconds in breakdown.items():
        print(f"| {name} | {milliseconds:.2f} |")


if __name__ == "__main__":
    main()
