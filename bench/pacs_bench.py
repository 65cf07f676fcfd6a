"""PACS retrieve benchmark: a synthetic CT study in a local Orthanc (Debian's orthanc + orthanc-dicomweb, started
here on free loopback ports), retrieved over DICOMweb by `medvqa pacs retrieve` (through the whole import path)
against the floor measured in the same run: a bare dicomweb-client download of the same study (retrieve_study,
every instance parsed by pydicom), and the same plus pixel_array.

    .venv/bin/python bench/pacs_bench.py [--slices 200] [--size 512] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medvqa.config import load_settings
from medvqa.db.engine import Database
from medvqa.db.migrate import upgrade
from medvqa.services.audit import Actor
from medvqa.services.pacs import retrieve_study
from tests.pacs_server import Orthanc, missing, seed_study

OPERATOR = Actor("bench", "admin")


def seed(server: Orthanc, slices: int, size: int) -> str:
    """One series of `slices` CT slices that declare BurnedInAnnotation NO (no OCR), as tests/pacs_server seeds."""
    return seed_study(
        server, patient_id="BENCH-1", accession="BENCH-ACC", study_date="20260101", series=1, slices=slices, size=size
    ).study_uid


def bare(server: Orthanc, study: str, pixels: bool) -> float:
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.auth = (server.user, server.password)
    client = DICOMwebClient(server.dicomweb_url, session=session)
    start = time.perf_counter()
    for dataset in client.iter_study(study):
        if pixels:
            _ = dataset.pixel_array
    return time.perf_counter() - start


def ours(server: Orthanc, study: str, home: Path, workers: int) -> float:
    for key, value in server.settings_env().items():
        os.environ[key] = value
    settings = load_settings(home=home, database_url=f"sqlite:///{home / 'bench.db'}", import_workers=workers)
    home.mkdir(parents=True, exist_ok=True)
    database = Database.from_settings(settings)
    upgrade(database)
    start = time.perf_counter()
    report = retrieve_study(database, OPERATOR, study, settings)
    elapsed = time.perf_counter() - start
    assert report.complete and report.count("imported") == report.listed, report.as_dict()["files"][:3]
    database.dispose()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if missing():
        sys.exit(missing())
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        server = Orthanc(root / "orthanc").start()
        try:
            study = seed(server, args.slices, args.size)
            bare(server, study, pixels=False)  # warm Orthanc's cache and the connection for every contender
            floor = min(bare(server, study, pixels=False) for _ in range(2))
            floor_pixels = min(bare(server, study, pixels=True) for _ in range(2))
            rows = [
                (f"medvqa pacs retrieve, {w} worker(s)", ours(server, study, root / f"home-{w}", w))
                for w in sorted({1, args.workers})
            ]
        finally:
            server.remove()
    megabytes = args.slices * args.size * args.size * 2 / 1e6
    print(
        f"\n{args.slices} slices of {args.size}x{args.size} CT ({megabytes:.0f} MB of pixels) from a local Orthanc, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPU cores\n"
    )
    print("| retrieve | s | MB/s | / bare download |\n|---|---:|---:|---:|")
    print(f"| bare dicomweb-client iter_study | {floor:.2f} | {megabytes / floor:.0f} | 1.00 |")
    print(
        f"| bare dicomweb-client + pixel_array | {floor_pixels:.2f} | {megabytes / floor_pixels:.0f} | "
        f"{floor_pixels / floor:.2f} |"
    )
    for label, seconds in rows:
        print(f"| {label} | {seconds:.2f} | {megabytes / seconds:.0f} | {seconds / floor:.2f} |")


if __name__ == "__main__":
    main()
