"""`medvqa import` never aborts, never drops an input silently, never shows a traceback, and never leaves the store
and the database out of step: hostile inputs of every kind the issue names, mixed with valid ones."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import hypothesis
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck
from hypothesis import strategies as st
from sqlalchemy import select, text

from medvqa.cli import main
from medvqa.config import load_settings
from medvqa.db import AuditEvent, Instance
from medvqa.imaging.store import ContentStore
from medvqa.services.store_check import check_store
from medvqa.services.studies import import_paths
from tests import factories
from tests import hostile_inputs as hostile
from tests.phi_factory import phi_strings

SMALL_LIMITS = {"MEDVQA_IMPORT_MAX_FILE_BYTES": str(4 << 20), "MEDVQA_IMPORT_MAX_INSTANCES": "100"}


@pytest.fixture
def settings(tmp_path):
    return load_settings(home=tmp_path / "home")


def assert_store_matches_database(db, settings) -> None:
    """The store holds only files the database references, and the database references only files that exist."""
    report = check_store(db, factories.OPERATOR, settings)
    assert (report.unreferenced, report.leftovers, report.missing) == ([], [], [])


def run_cli(env: dict[str, str], *args: str, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medvqa.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def report_lines(stdout: str) -> list[str]:
    """The per-input lines (the summary line, and any note after it, left out)."""
    lines = stdout.splitlines()
    summary = next(i for i, line in enumerate(lines) if line.startswith("imported ") and "instance(s) into" in line)
    return lines[:summary]


def _names(line: str, name: str) -> bool:
    """Whether a report line ("status: name", "status: name: reason", "imported: name (held ...)") is about name."""
    rest = line.split(": ", 1)[1]
    return rest == name or rest.startswith((name + ": ", name + " ("))


def test_a_folder_of_hostile_and_valid_inputs_gives_one_line_each(db, cli_env, settings, tmp_path):
    folder = tmp_path / "in"
    expected = hostile.write_mixed_folder(folder, tmp_path / "elsewhere")
    env = {**cli_env, **SMALL_LIMITS}
    result = run_cli(env, "import", str(folder))  # a FIFO opened by mistake would block: the timeout catches it
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and result.stderr == ""
    lines = report_lines(result.stdout)
    assert len(lines) == len(expected), "\n".join(lines)
    for item in expected:
        name = f"{folder}/{item.name}"
        mine = [line for line in lines if _names(line, name)]
        assert len(mine) == 1, (item, mine)
        status = {"duplicate": "already stored"}.get(item.status, item.status)
        assert mine[0].startswith(f"{status}: "), (item, mine[0])
        assert item.reason in mine[0], (item, mine[0])
    for value in [*phi_strings(), "Phisurname"]:
        assert value not in output
    assert_store_matches_database(db, load_settings())

    again = run_cli(env, "import", str(folder), "--json")  # the same inputs: valid ones are now already stored
    assert again.returncode == 1 and again.stderr == ""
    records = json.loads(again.stdout)["files"]
    assert len(records) == len(lines) and all(_names(line, r["source"]) for line, r in zip(lines, records, strict=True))
    statuses = {r["source"].removeprefix(f"{folder}/"): r["status"] for r in records}
    for item in expected:
        assert statuses[item.name] == ("duplicate" if item.status == "imported" else item.status), item
    assert all(r["reason"] for r in records if r["status"] in ("refused", "skipped"))
    assert_store_matches_database(db, load_settings())


def test_fifos_and_devices_named_on_the_command_line_are_refused_unopened(db, cli_env, tmp_path):
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    good = tmp_path / "good.dcm"
    good.write_bytes(hostile.valid_dicom(0))
    result = run_cli(cli_env, "import", str(fifo), "/dev/zero", str(good), timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = report_lines(result.stdout)
    assert lines == [
        f"refused: {fifo}: a FIFO (named pipe) is not a file: not opened",
        "refused: /dev/zero: a device is not a file: not opened",
        f"imported: {good}",
    ]


def test_a_link_given_on_the_command_line_is_followed_but_links_in_folders_are_not(db, settings, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.dcm").write_bytes(hostile.valid_dicom(0))
    (real / "b.dcm").write_bytes(hostile.valid_dicom(1))
    os.symlink(real, tmp_path / "link-to-folder")
    os.symlink(real / "a.dcm", real / "again.dcm")
    report = import_paths(db, factories.OPERATOR, [tmp_path / "link-to-folder"], settings)
    outcomes = {Path(o.source).name: (o.status, o.reason) for o in report.outcomes}
    assert outcomes["a.dcm"][0] == outcomes["b.dcm"][0] == "imported"
    assert outcomes["again.dcm"][0] == "skipped"  # its target is imported once, under its own name
    assert all(o.source.startswith(str(tmp_path / "link-to-folder")) for o in report.outcomes)


def test_dicomdir_entries_are_resolved_inside_its_folder(db, settings, tmp_path):
    disc = tmp_path / "disc"
    (disc / "IMAGES").mkdir(parents=True)
    (disc / "IMAGES" / "im1").write_bytes(hostile.valid_dicom(0))  # listed upper case, copied lower case
    (tmp_path / "secret.dcm").write_bytes(hostile.valid_dicom(1, study="55"))
    os.symlink(tmp_path / "secret.dcm", disc / "IMAGES" / "LINK")
    file_ids = [["IMAGES", "IM1"], ["IMAGES", "GONE"], ["..", "secret.dcm"], ["", "etc", "passwd"], ["IMAGES", "LINK"]]
    (disc / "DICOMDIR").write_bytes(hostile.dicomdir(file_ids))
    report = import_paths(db, factories.OPERATOR, [disc / "DICOMDIR"], settings)
    outcomes = [(o.source.removeprefix(f"{disc}/"), o.status, o.reason) for o in report.outcomes]
    assert [o[:2] for o in outcomes] == [
        ("IMAGES/IM1", "imported"),
        ("IMAGES/GONE", "refused"),
        ("../secret.dcm", "refused"),
        ("/etc/passwd", "refused"),
        ("IMAGES/LINK", "refused"),
    ]
    assert "missing" in outcomes[1][2]
    assert all("outside its folder" in reason for _, _, reason in outcomes[2:])
    with db.read_session() as session:
        assert session.scalar(select(Instance.id).where(Instance.instance_number == 2)) is None  # secret never read


def test_a_dicomdir_with_nothing_listed_and_an_empty_zip_and_folder_each_get_a_line(db, settings, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "DICOMDIR").write_bytes(hostile.dicomdir([]))
    (tmp_path / "empty.zip").write_bytes(hostile.zip_bytes({}))
    paths = [tmp_path / "empty", tmp_path / "DICOMDIR", tmp_path / "empty.zip"]
    report = import_paths(db, factories.OPERATOR, paths, settings)
    assert [(o.source, o.status) for o in report.outcomes] == [(str(p), "skipped") for p in paths]


def test_zip_end_records_that_lie_about_the_central_directory_are_refused_unopened(db, settings, tmp_path):
    data = bytearray(hostile.zip_bytes({"a.dcm": hostile.valid_dicom(0)}))
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HHI", data, end + 8, 0xFFFF, 0xFFFF, 0xFFFFFFF0)  # entries, and a 4 GB directory
    (tmp_path / "liar.zip").write_bytes(bytes(data))
    (tmp_path / "many.zip").write_bytes(hostile.zip_with_many_members(300))
    few = load_settings(home=settings.home, import_max_instances=100)
    report = import_paths(db, factories.OPERATOR, [tmp_path / "liar.zip", tmp_path / "many.zip"], few)
    assert [(o.status, "not opened" in o.reason) for o in report.outcomes] == [("refused", True)] * 2


def _fail_instances_numbered_99(db) -> None:
    """A real database refusal for one study's write: a trigger rejects an instance row."""
    if db.engine.dialect.name == "sqlite":
        statements = [
            "CREATE TRIGGER test_refuse BEFORE INSERT ON instances WHEN NEW.instance_number = 99 "
            "BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
        ]
    else:
        statements = [
            "CREATE FUNCTION test_refuse() RETURNS trigger AS $$ BEGIN IF NEW.instance_number = 99 THEN "
            "RAISE EXCEPTION 'refused by a test trigger'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER test_refuse BEFORE INSERT ON instances FOR EACH ROW EXECUTE FUNCTION test_refuse()",
        ]
    with db.engine.begin() as connection:
        for statement in statements:
            connection.execute(text(statement))


def test_files_of_a_study_whose_database_write_fails_are_removed(db, settings, tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    (first / "a0.dcm").write_bytes(hostile.valid_dicom(0))
    import_paths(db, factories.OPERATOR, [first], settings)
    kept = sorted(settings.store_dir.rglob("*.dcm"))
    _fail_instances_numbered_99(db)
    second = tmp_path / "second"
    second.mkdir()
    (second / "a0.dcm").write_bytes(hostile.valid_dicom(0))  # stored before: its file is referenced, and stays
    (second / "a98.dcm").write_bytes(hostile.valid_dicom(98))  # InstanceNumber 99: the study's write fails
    (second / "b.dcm").write_bytes(hostile.valid_dicom(2, study="77"))  # another study: imported all the same
    report = import_paths(db, factories.OPERATOR, [second], settings)
    outcomes = {Path(o.source).name: o for o in report.outcomes}
    assert outcomes["b.dcm"].status == "imported"
    assert outcomes["a0.dcm"].status == outcomes["a98.dcm"].status == "refused"
    assert "refused by a test trigger" in outcomes["a98.dcm"].reason and "\n" not in outcomes["a98.dcm"].reason
    assert report.left_in_store == 0
    assert set(kept) <= set(settings.store_dir.rglob("*.dcm"))
    assert len(list(settings.store_dir.rglob("*.dcm"))) == len(kept) + 1  # a98's file went, b's came
    assert_store_matches_database(db, settings)


def test_an_unforeseen_error_in_one_input_is_that_inputs_refusal(db, settings, tmp_path, monkeypatch, caplog):
    """Fault injection: whatever the per-input path raises (here a KeyError quoting a fake identifier) refuses
    that input with its type and place, never its message, and the rest of the import goes on."""
    from medvqa.services import preparation

    real = preparation.prepare_instance

    def flaky(data, *args):
        if b"4444444444444444" + b"0001" in data:
            raise KeyError("Phisurname^Phigiven")
        return real(data, *args)

    monkeypatch.setattr(preparation, "prepare_instance", flaky)
    for index in range(3):
        (tmp_path / f"s{index}.dcm").write_bytes(hostile.valid_dicom(index))
    report = import_paths(db, factories.OPERATOR, sorted(tmp_path.glob("s*.dcm")), settings)
    assert [o.status for o in report.outcomes] == ["imported", "refused", "imported"]
    assert report.outcomes[1].reason.startswith("unexpected error (KeyError at ")
    assert "Phisurname" not in report.outcomes[1].reason + caplog.text
    assert_store_matches_database(db, settings)


def _kill_an_import_midway(cli_env: dict[str, str], folder: Path) -> Path:
    """Start `medvqa import folder` and SIGKILL it once it has stored some files (before its rows commit)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "medvqa.cli", "import", str(folder)],
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    store = Path(cli_env["MEDVQA_HOME"]) / "store"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(store.rglob("*.dcm"))) < 20:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    (store / "ab").mkdir(exist_ok=True)
    (store / "ab" / ".incoming-killed").write_bytes(b"half a file")  # what a writer killed mid-write leaves
    return store


def _many_slices(folder: Path, count: int = 400) -> Path:
    folder.mkdir()
    for index in range(count):
        (folder / f"s{index:03d}.dcm").write_bytes(hostile.valid_dicom(index))
    return folder


def test_a_killed_import_leaves_only_files_that_store_check_prunes(db, cli_env, tmp_path):
    folder = _many_slices(tmp_path / "many")
    _kill_an_import_midway(cli_env, folder)
    settings = load_settings()
    check = run_cli(cli_env, "store", "check", "--json")
    found = json.loads(check.stdout)
    # Left over: the planted temp file and the marker, and the killed writer's own temp file when the kill
    # landed mid-write.
    assert check.returncode == 1 and found["unreferenced"] >= 1 and found["leftovers"] in (2, 3)
    pruned = run_cli(cli_env, "store", "check", "--prune")
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert f"removed {found['unreferenced'] + found['leftovers']} file(s)" in pruned.stdout
    assert_store_matches_database(db, settings)
    with db.read_session() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "system:store:check")).one()
    assert event.details["removed_unreferenced"] == found["unreferenced"]
    again = run_cli(cli_env, "import", str(folder))  # and the interrupted import can simply be run again
    assert again.returncode == 0 and again.stdout.count("\n") == 401
    assert_store_matches_database(db, settings)


def test_the_next_import_sweeps_what_a_killed_import_left(db, cli_env, tmp_path):
    store = _kill_an_import_midway(cli_env, _many_slices(tmp_path / "many"))
    orphans = len(list(store.rglob("*.dcm")))
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.dcm").write_bytes(hostile.valid_dicom(7, study="88"))
    result = run_cli(cli_env, "import", str(other))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"removed {orphans} unreferenced file(s) an interrupted import had left in the store" in result.stdout
    assert [p.name for p in store.iterdir() if p.name.startswith(".")] == [".lock"]
    assert_store_matches_database(db, load_settings())


def test_store_check_reports_missing_files_and_refuses_other_roles(db, settings, tmp_path):
    (tmp_path / "a.dcm").write_bytes(hostile.valid_dicom(0))
    import_paths(db, factories.OPERATOR, [tmp_path / "a.dcm"], settings)
    stored = next(settings.store_dir.rglob("*.dcm"))
    stored.unlink()
    report = check_store(db, factories.OPERATOR, settings, prune=True)
    assert not report.ok and [path for _, path in report.missing] == [stored.relative_to(settings.store_dir).as_posix()]
    from medvqa.errors import AccessDenied

    with pytest.raises(AccessDenied):
        check_store(db, factories.make_user(db, "clinician"), settings)


def test_store_check_waits_for_a_running_import(settings):
    from medvqa.imaging.store import StoreError
    from medvqa.services import store_check

    store = ContentStore(settings.store_dir)
    with store.lock(), pytest.raises(StoreError, match="in use by an import"), store.lock(exclusive=True, wait_s=0.2):
        pass
    assert store_check.LOCK_WAIT_S > 0


# --- memory: bombs are refused within the file limit ----------------------------------------------------------------


def _peak_of_import(db, path: Path, settings) -> tuple[int, str, str]:
    tracemalloc.start()
    try:
        report = import_paths(db, factories.OPERATOR, [path], settings)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    [outcome] = report.outcomes
    return peak, outcome.status, outcome.reason


def test_bombs_are_refused_without_allocating_beyond_the_limit(db, settings, tmp_path):
    """tracemalloc counts every Python allocation (bytes, numpy arrays, zlib output): refusing a bomb that inflates
    to 64 MiB under a 16 MiB file limit may cost the limit plus a constant, never the bomb's inflated size. The
    streamed checks in fact stay far below the limit; the test allows limit + 2 MiB."""
    limit = 16 << 20
    small = load_settings(home=settings.home, import_max_file_bytes=limit)
    (tmp_path / "warm.dcm").write_bytes(hostile.valid_dicom(0))
    import_paths(db, factories.OPERATOR, [tmp_path / "warm.dcm"], small)  # modules and caches loaded first
    bombs = {
        "deflate.dcm": hostile.deflate_bomb(64 << 20),
        "bomb.png": hostile.png_bomb(6000, 6000),
        "member.zip": hostile.zip_bomb_member(64 << 20),
        "liar.zip": hostile.lying_size_member(64 << 20),
    }
    for name, data in bombs.items():
        path = tmp_path / name
        path.write_bytes(data)
        del data
        peak, status, reason = _peak_of_import(db, path, small)
        assert status == "refused" and reason and "\n" not in reason, (name, reason)
        assert peak < limit + (2 << 20), (name, peak)
        assert peak < 8 << 20, f"{name}: the refusal held {peak} bytes; a streamed check holds a few MiB"


# --- hypothesis: mutated DICOM and zip files never raise, never orphan, one line per input ----------------------------

VALID = hostile.valid_dicom(0)
VALID_ZIP = hostile.zip_bytes({"s1.dcm": hostile.valid_dicom(1), "s2.dcm": hostile.valid_dicom(2)})
mutations = st.tuples(
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6),  # byte flips
    st.one_of(st.none(), st.integers(0, 1 << 16)),  # a cut
)


def _mutate(data: bytes, mutation: tuple[list[tuple[int, int]], int | None]) -> bytes:
    flips, cut = mutation
    out = bytearray(data)
    for position, value in flips:
        out[position % len(out)] = value
    if cut is not None:
        del out[cut % (len(out) + 1) :]
    return bytes(out)


@hypothesis.settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@hypothesis.given(dicom=mutations, archive=mutations)
def test_mutated_dicom_and_zip_files_import_or_refuse_one_line_each(db, settings, tmp_path_factory, dicom, archive):
    folder = tmp_path_factory.mktemp("mutated")
    (folder / "a.dcm").write_bytes(_mutate(VALID, dicom))
    (folder / "b.zip").write_bytes(_mutate(VALID_ZIP, archive))
    (folder / "c.dcm").write_bytes(hostile.valid_dicom(3))
    report = import_paths(db, factories.OPERATOR, [folder], settings)
    names = [outcome.source.removeprefix(f"{folder}/") for outcome in report.outcomes]
    assert names.count("a.dcm") == 1 and names.count("c.dcm") == 1
    zip_names = [name for name in names if name.startswith("b.zip")]
    assert zip_names == ["b.zip"] or (zip_names and all(name.startswith("b.zip!") for name in zip_names))
    assert len(names) == 2 + len(zip_names)
    for outcome in report.outcomes:
        assert "\n" not in outcome.line() and (outcome.reason or outcome.status in ("imported", "duplicate"))
    assert report.outcomes[names.index("c.dcm")].status in ("imported", "duplicate")
    assert_store_matches_database(db, settings)


def test_cli_prints_one_line_per_input_with_the_summary_last(db, cli_env, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(2):
        (folder / f"s{index}.dcm").write_bytes(hostile.valid_dicom(index))
    (folder / "bad.dcm").write_bytes(b"")
    first = CliRunner().invoke(main, ["import", str(folder / "s0.dcm")])
    assert first.exit_code == 0 and first.stdout.splitlines()[0] == f"imported: {folder / 's0.dcm'}"
    result = CliRunner().invoke(main, ["import", str(folder)])
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        f"refused: {folder / 'bad.dcm'}: empty file",
        f"already stored: {folder / 's0.dcm'}",
        f"imported: {folder / 's1.dcm'}",
        "imported 1 instance(s) into 1 study(ies); 1 already stored, 0 skipped, 1 refused, "
        "0 held until a reviewer confirms there is no burned-in text",
    ]


def test_encrypted_member_among_valid_members_refuses_only_itself(db, settings, tmp_path):
    valid = hostile.valid_dicom(0)
    data = bytearray(hostile.zip_bytes({"ok.dcm": valid, "locked.dcm": hostile.valid_dicom(1)}, zipfile.ZIP_STORED))
    second = data.find(b"PK\x03\x04", 4)  # the second member's local header, then its central header
    data[second + 6] |= 1
    central = [i for i in range(len(data)) if data[i : i + 4] == b"PK\x01\x02"][1]
    data[central + 8] |= 1
    (tmp_path / "mixed.zip").write_bytes(bytes(data))
    report = import_paths(db, factories.OPERATOR, [tmp_path / "mixed.zip"], settings)
    assert [(o.source.split("!")[1], o.status) for o in report.outcomes] == [
        ("ok.dcm", "imported"),
        ("locked.dcm", "refused"),
    ]


def test_the_odd_size_in_a_series_is_refused_whichever_comes_first(db, settings, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a-small.dcm").write_bytes(hostile.valid_dicom(9, rows=8, columns=8))  # listed first
    for index in range(3):
        (folder / f"s{index}.dcm").write_bytes(hostile.valid_dicom(index))
    report = import_paths(db, factories.OPERATOR, [folder], settings)
    assert [o.status for o in report.outcomes] == ["refused", "imported", "imported", "imported"]
    assert "grey 8 x 8 image differs from the rest of its series (grey 16 x 16 image)" in report.outcomes[0].reason
    later = tmp_path / "later"
    later.mkdir()
    for index in (20, 21):  # a later import of the odd size alone: the stored series decides
        (later / f"small{index}.dcm").write_bytes(hostile.valid_dicom(index, rows=8, columns=8))
    again = import_paths(db, factories.OPERATOR, [later], settings)
    assert [o.status for o in again.outcomes] == ["refused", "refused"]
    assert_store_matches_database(db, settings)


def test_a_defect_outside_any_one_input_stops_the_import_in_one_line(db, cli_env, tmp_path, monkeypatch):
    """Fault injection in the orchestration itself (not in an input): one line on stderr, exit 1, no traceback."""
    from medvqa.services import studies

    def broken(*args, **kwargs):
        raise RuntimeError("Phisurname^Phigiven")

    monkeypatch.setattr(studies, "open_sources", broken)
    (tmp_path / "a.dcm").write_bytes(hostile.valid_dicom(0))
    result = CliRunner().invoke(main, ["import", str(tmp_path / "a.dcm")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("medvqa: error: the import stopped on unexpected error (RuntimeError at ")
    assert result.stderr.count("\n") == 1 and "Phisurname" not in result.stderr


def test_a_dicomdir_cut_short_is_refused_not_taken_for_a_shorter_one(db, settings, tmp_path):
    """Cut anywhere, a DICOMDIR is refused: pydicom would read the records before the cut and drop the rest."""
    whole = hostile.dicomdir([[f"F{index}.DCM"] for index in range(5)])
    for cut in (len(whole) // 3, len(whole) // 2, len(whole) * 4 // 5, len(whole) - 1):
        (tmp_path / "DICOMDIR").write_bytes(whole[:cut])
        report = import_paths(db, factories.OPERATOR, [tmp_path / "DICOMDIR"], settings)
        [outcome] = report.outcomes
        assert outcome.status == "refused", (cut, outcome.reason)
        assert "DICOMDIR" in outcome.reason or "declares" in outcome.reason, (cut, outcome.reason)


COMPONENTS = st.sampled_from(["..", ".", "", "IMAGES", "IM1", "secret.dcm", "LINK", "/", "\\", "C:", "a/b", "..\\x"])


@hypothesis.settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@hypothesis.given(file_ids=st.lists(st.lists(COMPONENTS, min_size=1, max_size=4), min_size=1, max_size=5))
def test_no_dicomdir_entry_reads_outside_its_folder(db, settings, tmp_path_factory, file_ids):
    root = tmp_path_factory.mktemp("disc")
    disc = root / "disc"
    (disc / "IMAGES").mkdir(parents=True)
    (disc / "IMAGES" / "IM1").write_bytes(hostile.valid_dicom(0))
    (root / "secret.dcm").write_bytes(hostile.valid_dicom(1, study="66"))
    (disc / "secret.dcm").symlink_to(root / "secret.dcm")
    (disc / "IMAGES" / "LINK").symlink_to(root / "secret.dcm")
    (disc / "DICOMDIR").write_bytes(hostile.dicomdir(file_ids))
    report = import_paths(db, factories.OPERATOR, [disc / "DICOMDIR"], settings)
    assert len(report.outcomes) == len(file_ids)
    for outcome, parts in zip(report.outcomes, file_ids, strict=True):
        assert "\n" not in outcome.line()
        if outcome.status in ("imported", "duplicate"):
            assert [p for p in parts if p] and all(p not in ("..", ".", "") for p in parts), parts
    with db.read_session() as session:
        assert session.scalar(select(Instance.id).where(Instance.instance_number == 2)) is None  # never read
    assert_store_matches_database(db, settings)


@hypothesis.settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@hypothesis.given(
    name=st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), min_size=1, max_size=40)
)
def test_any_file_name_gives_exactly_one_line(db, settings, tmp_path_factory, name):
    hypothesis.assume(name not in (".", "..") and len(name.encode()) < 200)
    folder = tmp_path_factory.mktemp("names")
    (folder / name).write_bytes(hostile.valid_dicom(0))
    report = import_paths(db, factories.OPERATOR, [folder], settings)
    [outcome] = report.outcomes
    assert outcome.status in ("imported", "duplicate") and "\n" not in outcome.line() and "\r" not in outcome.line()
    assert outcome.line().isprintable()


def test_files_left_while_another_import_runs_are_swept_by_the_next_import(db, settings, tmp_path):
    """Another import holds the store (here: a shared lock taken by the test): the refused instance's file cannot
    be removed at once (the other import might be about to reference it), is counted, and the next import that
    runs alone removes it."""
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(2):
        (folder / f"s{index}.dcm").write_bytes(hostile.valid_dicom(index))
    (folder / "small.dcm").write_bytes(hostile.valid_dicom(5, rows=8, columns=8))  # refused after it was stored
    with ContentStore(settings.store_dir).lock():
        report = import_paths(db, factories.OPERATOR, [folder], settings)
    assert report.left_in_store == 1 and [o.status for o in report.outcomes] == ["imported", "imported", "refused"]
    assert check_store(db, factories.OPERATOR, settings).unreferenced  # the one file, for now
    (tmp_path / "next.dcm").write_bytes(hostile.valid_dicom(9, study="99"))
    after = import_paths(db, factories.OPERATOR, [tmp_path / "next.dcm"], settings)
    assert after.swept == 1 and after.left_in_store == 0
    assert_store_matches_database(db, settings)
