"""Imports prepared in worker processes give what the importing process gives, in input order, and a file that
kills its worker is refused alone (one line) while the rest of the import goes on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import select

from medvqa.config import load_settings
from medvqa.db import Instance
from medvqa.services import preparation
from medvqa.services.studies import import_paths
from tests import factories, hostile_inputs
from tests.test_import_robust import assert_store_matches_database

pytestmark = pytest.mark.db
CRASH_MARKER = b"KILL-THE-WORKER"


def crash_on_marker(name: str, data: bytes):
    """Runs in the worker process (pickled by name): dies like a decoder that segfaults on this input."""
    if CRASH_MARKER in data:
        os._exit(139)
    return preparation._worker_prepare(name, data)


def _files(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    paths = []
    for index in range(count):
        path = folder / f"s{index:02d}.dcm"
        path.write_bytes(hostile_inputs.valid_dicom(index, study=str(index % 2 + 1)))
        paths.append(path)
    (folder / "not-dicom.txt").write_bytes(b"plain text")
    return sorted(folder.iterdir())


def _settings(tmp_path: Path, workers: int):
    return load_settings(home=tmp_path / f"home-{workers}", import_workers=workers)


def _instances(db) -> list[tuple[str, str]]:
    with db.read_session() as session:
        return sorted(tuple(row) for row in session.execute(select(Instance.sop_instance_uid, Instance.pixel_hash)))


def test_workers_give_the_same_outcomes_and_rows_as_one_process(db, tmp_path):
    paths = _files(tmp_path / "in", 20)
    parallel_settings = _settings(tmp_path, 2)
    parallel = import_paths(db, factories.OPERATOR, paths, parallel_settings)
    assert [o.source for o in parallel.outcomes] == [str(p) for p in paths]  # input order, one line each
    assert [o.status for o in parallel.outcomes] == ["refused"] + ["imported"] * 20
    assert len(parallel.study_ids) == 2
    assert_store_matches_database(db, parallel_settings)
    rows = _instances(db)
    assert len(rows) == 20
    again = import_paths(db, factories.OPERATOR, paths, parallel_settings)
    assert again.count("duplicate") == 20 and _instances(db) == rows


def test_one_process_and_workers_store_the_same_instances(tmp_path):
    """The same key and files give byte-identical stores whichever way they were prepared."""
    from compliance.deid import DeidSettings
    from medvqa.imaging.reader import ImportLimits
    from medvqa.imaging.sources import open_sources
    from medvqa.imaging.store import ContentStore

    paths = _files(tmp_path / "in", 17)
    limits = ImportLimits(1 << 30, 300_000_000, 20_000)
    stored = []
    for workers in (1, 2):
        store = ContentStore(tmp_path / f"store-{workers}")
        preparer = preparation.Preparer(DeidSettings(b"k" * 32), store.root, limits)
        with open_sources(paths, limits) as items:
            prepared = preparer.prepare_all(items, store, workers)
        stored.append(([(o.status, r.storage_path if r else None) for o, r in prepared], sorted(store.created)))
    assert stored[0] == stored[1] and len(stored[0][1]) == 17


def test_a_file_that_kills_its_worker_is_refused_alone(db, tmp_path, monkeypatch):
    paths = _files(tmp_path / "in", 20)
    assert len(paths) > preparation.MIN_FILES_FOR_WORKERS  # so that workers prepare them
    paths[4].write_bytes(paths[4].read_bytes() + CRASH_MARKER)
    monkeypatch.setattr(preparation, "_worker_prepare", crash_on_marker)
    settings = _settings(tmp_path, 2)
    report = import_paths(db, factories.OPERATOR, paths, settings)
    by_name = {Path(o.source).name: o for o in report.outcomes}
    killer = by_name[paths[4].name]
    assert killer.status == "refused" and killer.reason.startswith("reading it stopped the import worker")
    assert sum(o.status == "imported" for o in report.outcomes) == 19
    assert_store_matches_database(db, settings)
