"""Workbench interaction benchmark: how fast the Ask page answers a slice or window change (no model call).

A synthetic CT series (default 300 slices of 512x512, the phantom of import_bench.py) is imported into a scratch
SQLite database; then the Ask page runs through streamlit.testing's AppTest, signed in as a clinician, and each
interaction is one full script rerun, exactly what the server does on a widget change (the websocket delta to
the browser is not included). The goal: well under half a second per interaction.

    .venv/bin/python bench/workbench_bench.py [--slices 300] [--size 512] [--runs 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from import_bench import ct_slice  # same folder: the same phantom series as the import benchmark

GOAL_MS = 500.0


def build_database(home: Path, slices: int, size: int) -> tuple[object, int]:
    """A migrated scratch database with one imported series and a clinician; returns (actor, series id)."""
    from sqlalchemy import select

    from medvqa.config import load_settings
    from medvqa.db import Series
    from medvqa.db.engine import Database
    from medvqa.db.migrate import upgrade
    from medvqa.services.audit import Actor
    from medvqa.services.studies import import_paths
    from medvqa.services.users import add_user

    settings = load_settings()
    home.mkdir(parents=True, exist_ok=True)
    db = Database.from_settings(settings)
    upgrade(db)
    operator = Actor("bench", "admin")
    folder, rng = home / "series", np.random.default_rng(0)
    folder.mkdir()
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    paths = []
    for index in range(slices):
        path = folder / f"{index:04d}.dcm"
        pydicom.dcmwrite(path, ct_slice(index, size, study, series, rng), enforce_file_format=True)
        paths.append(path)
    import_paths(db, operator, paths, settings)
    user = add_user(db, operator, "bench.clinician", "bench-password-123", "clinician")
    with db.read_session() as session:
        series_id = session.scalars(select(Series.id)).one()
    db.dispose()
    return Actor(user.username, "clinician", user.id), series_id


def timed(action: Callable[[], object], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["MEDVQA_HOME"] = str(Path(scratch) / "home")
        for name in ("MEDVQA_DATABASE_URL", "MEDVQA_AUDIT_ANCHOR", "MEDVQA_CONFIG"):
            os.environ.pop(name, None)
        start = time.perf_counter()
        actor, series_id = build_database(Path(scratch) / "home", args.slices, args.size)
        print(f"setup: {args.slices} slices of {args.size}x{args.size} imported in {time.perf_counter() - start:.1f} s")
        report(run_interactions(actor, series_id, args.slices, args.runs), args)


def run_interactions(actor: object, series_id: int, slices: int, runs: int) -> dict[str, list[float]]:
    from streamlit.testing.v1 import AppTest

    from medvqa.imaging.series import PRESETS
    from medvqa.services.viewer import render_slice
    from workbench import APP_PATH, resources
    from workbench.auth import ACTOR

    app = AppTest.from_file(str(APP_PATH), default_timeout=300)
    app.session_state[ACTOR] = actor
    results = {"first open (reads the series from the store)": timed(app.run, 1)}
    assert not app.exception, app.exception
    rng = random.Random(0)
    slider = f"slice_{series_id}"
    results["slice change (slider)"] = timed(
        lambda: app.slider(key=slider).set_value(rng.randrange(slices)).run(), runs
    )
    presets = ["default", *PRESETS]
    results["window preset change"] = timed(
        lambda: app.selectbox(key="window_name").set_value(rng.choice(presets)).run(), runs
    )
    app.selectbox(key="window_name").set_value("manual").run()
    results["manual centre change"] = timed(
        lambda: app.number_input(key="window_centre").set_value(float(rng.randrange(-200, 400))).run(), runs
    )
    volume = resources.volume(actor, series_id)  # type: ignore[arg-type]
    results["render_slice alone (service)"] = timed(
        lambda: render_slice(volume, rng.randrange(slices), rng.choice(presets)), runs * 10
    )
    assert not app.exception, app.exception
    return results


def report(results: dict[str, list[float]], args: argparse.Namespace) -> None:
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"series {args.slices} x {args.size}x{args.size}; one interaction = one full rerun of the Ask page\n")
    print("| interaction | runs | median ms | p90 ms | max ms | under 500 ms |")
    print("|---|---:|---:|---:|---:|---|")
    for name, times in results.items():
        ordered = sorted(times)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        verdict = "-" if name.startswith("first") else ("yes" if p90 < GOAL_MS else "NO")
        print(f"| {name} | {len(times)} | {statistics.median(times):.1f} | {p90:.1f} | {max(times):.1f} | {verdict} |")


if __name__ == "__main__":
    main()
