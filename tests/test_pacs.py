"""A real PACS (Orthanc, started by the fixture): search, retrieve through the import path, resume, refuse.

Covers DICOMweb (QIDO-RS, WADO-RS) and DIMSE (C-FIND, C-GET, C-STORE to `medvqa listen`): each filter,
a multi-series study, a transfer cut when the server stops and completed by a rerun, wrong credentials and a
server that is down (one line, nothing stored), a calling AE title that may not send (rejected and audited),
and that the PACS's identifiers never reach the database, the store or the audit trail.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from medvqa.cli import main
from medvqa.config import load_settings
from medvqa.db import AuditEvent, Instance, Study
from medvqa.db.engine import Database
from medvqa.errors import AccessDenied, InvalidInput
from medvqa.pacs.query import StudyQuery, parse_date_range
from medvqa.services import pacs as pacs_service
from medvqa.services.listener import listen
from tests import factories
from tests.pacs_server import Orthanc, SeededStudy, seed_study

pytestmark = pytest.mark.db


@pytest.fixture(scope="module")
def seeded(pacs_server: Orthanc) -> dict[str, SeededStudy]:
    """Three studies: a two-series CT, a one-series MR, and a CT with an encapsulated PDF among its instances."""
    studies = {
        "ct": seed_study(pacs_server, patient_id="PACS-PID-1", accession="PACS-ACC-1", study_date="20240102"),
        "mr": seed_study(
            pacs_server,
            patient_id="PACS-PID-2",
            accession="PACS-ACC-2",
            study_date="20240305",
            modality="MR",
            series=1,
            slices=2,
        ),
        "pdf": seed_study(
            pacs_server, patient_id="PACS-PID-3", accession="PACS-ACC-3", study_date="20240410", series=1, slices=2
        ),
    }
    pacs_server.upload(_encapsulated_pdf(studies["pdf"]))
    return studies


def _encapsulated_pdf(study: SeededStudy) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 9
    ds.Modality = "DOC"
    ds.PatientID = study.patient_id
    ds.PatientName = study.patient_name
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4 report for " + study.patient_name.encode() + b"\n%%EOF\n"
    return ds


def _settings():
    return load_settings()


def _find(db: Database, actor, via="dicomweb", **filters) -> list[str]:
    studies = pacs_service.find_studies(db, actor, StudyQuery.build(**filters), _settings(), via)
    return sorted(s.study_uid for s in studies)


def _pacs_events(db: Database, action: str) -> list[AuditEvent]:
    with db.read_session() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)))


@pytest.mark.parametrize("via", ["dicomweb", "dimse"])
def test_find_matches_each_filter(db, pacs_env, seeded, clinician, via):
    ct, mr = seeded["ct"], seeded["mr"]
    assert _find(db, clinician, via, patient_id=ct.patient_id) == [ct.study_uid]
    assert ct.study_uid in _find(db, clinician, via, patient_id="PACS-PID-*")
    assert _find(db, clinician, via, accession=mr.accession) == [mr.study_uid]
    assert _find(db, clinician, via, patient_id="PACS-PID-*", modality="mr") == [mr.study_uid]
    assert _find(db, clinician, via, patient_id="PACS-PID-*", dates="20240301-20240331") == [mr.study_uid]
    assert ct.study_uid not in _find(db, clinician, via, patient_id="PACS-PID-*", dates="20240103-")
    assert len(_find(db, clinician, via, patient_id="PACS-PID-*", limit=1)) == 1
    assert _find(db, clinician, via, patient_id="NOBODY-HERE") == []


def test_find_lists_what_a_clinician_needs_and_audits_keyed_filters(db, pacs_env, seeded, clinician):
    ct = seeded["ct"]
    [study] = pacs_service.find_studies(db, clinician, StudyQuery.build(accession=ct.accession), _settings())
    assert (study.study_uid, study.study_date.isoformat(), study.modalities) == (ct.study_uid, "2024-01-02", ("CT",))
    assert study.description == "Synthetic study" and study.instances == ct.instances
    [event] = _pacs_events(db, "pacs:study:find")
    assert event.actor_name == clinician.name and event.details["results"] == 1
    assert set(event.details["filters"]) == {"accession_keyed"}
    trail = json.dumps([e.details for e in _pacs_events(db, "pacs:study:find")])
    assert ct.accession not in trail and ct.study_uid not in trail


def test_find_needs_a_filter_and_a_role_that_may_search(db, pacs_env, seeded, clinician):
    with pytest.raises(InvalidInput, match="at least one"):
        pacs_service.find_studies(db, clinician, StudyQuery.build(), _settings())
    auditor = factories.make_user(db, "auditor")
    with pytest.raises(AccessDenied):
        pacs_service.find_studies(db, auditor, StudyQuery.build(modality="CT"), _settings())
    [denied] = _pacs_events(db, "pacs:study:find")
    assert denied.outcome == "denied" and denied.actor_name == auditor.name


@pytest.mark.parametrize("text", ["2024-01-01", "20241301", "20240201-20240101", "-", "abc"])
def test_bad_dates_are_one_line(text):
    with pytest.raises(InvalidInput, match=r"^date: "):
        parse_date_range(text)


def test_date_ranges_read_as_dicom_does():
    assert StudyQuery.build(dates="20240101").dicom_date_range == "20240101"
    assert StudyQuery.build(dates="20240101-").dicom_date_range == "20240101-"
    assert StudyQuery.build(dates="-20240131").dicom_date_range == "-20240131"


def _stored_text(settings) -> bytes:
    return b"".join(path.read_bytes() for path in Path(settings.store_dir).rglob("*") if path.is_file())


@pytest.mark.parametrize("via", ["dicomweb", "dimse"])
def test_retrieve_imports_a_multi_series_study_deidentified_and_once(db, pacs_env, seeded, clinician, via):
    ct, settings = seeded["ct"], _settings()
    report = pacs_service.retrieve_study(db, clinician, ct.study_uid, settings, via=via)
    assert report.complete and report.listed == 6 and report.count("imported") == 6
    with db.read_session() as session:
        [study] = session.scalars(select(Study)).all()
        assert study.study_uid == report.study_uid != ct.study_uid
        assert session.query(Instance).count() == 6
        assert len(set(session.scalars(select(Instance.series_id)))) == 2
    stored = _stored_text(settings)
    for identifier in (ct.patient_id, ct.patient_name, ct.accession, ct.study_uid, *ct.series_uids):
        assert identifier.encode() not in stored
    again = pacs_service.retrieve_study(db, clinician, ct.study_uid, settings, via=via)
    assert (again.already_stored, again.outcomes, again.study_ids) == (6, [], [study.id])
    events = _pacs_events(db, "pacs:study:retrieve")
    assert [e.outcome for e in events] == ["success", "success"]
    trail = json.dumps([e.details for e in events])
    assert ct.study_uid not in trail and ct.patient_id not in trail
    [import_event] = _pacs_events(db, "study:study:import")
    assert import_event.details["via"] == via and import_event.details["instances_new"] == 6


def test_a_study_larger_than_the_import_limit_is_refused_before_any_download(
    db, pacs_env, seeded, clinician, monkeypatch
):
    monkeypatch.setenv("MEDVQA_IMPORT_MAX_INSTANCES", "5")
    with pytest.raises(InvalidInput, match=r"lists 6 instances for this study, more than MEDVQA_IMPORT_MAX_INST"):
        pacs_service.retrieve_study(db, clinician, seeded["ct"].study_uid, _settings())
    [failed] = _pacs_events(db, "pacs:study:retrieve")
    assert failed.outcome == "failed"
    with db.read_session() as session:
        assert session.query(Instance).count() == 0
    report = pacs_service.retrieve_study(
        db, clinician, seeded["ct"].study_uid, _settings(), series_uid=seeded["ct"].series_uids[0]
    )
    assert report.count("imported") == 3  # series by series, as the message says


def test_retrieve_of_one_series(db, pacs_env, seeded, clinician):
    ct = seeded["ct"]
    report = pacs_service.retrieve_study(db, clinician, ct.study_uid, _settings(), series_uid=ct.series_uids[1])
    assert report.listed == 3 and report.count("imported") == 3


def test_a_hostile_instance_is_refused_with_its_line_and_the_rest_imported(db, pacs_env, seeded, cli_env):
    pdf = seeded["pdf"]
    result = CliRunner().invoke(main, ["pacs", "retrieve", pdf.study_uid])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    refused = [line for line in lines if line.startswith("refused:")]
    assert len(refused) == 1 and "series 2, instance 1 of 1" in refused[0]
    assert sum(line.startswith("imported:") for line in lines) == 2
    assert "Traceback" not in result.output and pdf.patient_name not in result.output


def test_cli_find_and_retrieve(db, pacs_env, seeded):
    mr = seeded["mr"]
    found = CliRunner().invoke(main, ["pacs", "find", "--accession", mr.accession, "--json"])
    assert found.exit_code == 0, found.output
    [listed] = json.loads(found.stdout)["studies"]
    assert listed["study_uid"] == mr.study_uid and listed["modalities"] == ["MR"]
    retrieved = CliRunner().invoke(main, ["pacs", "retrieve", mr.study_uid])
    assert retrieved.exit_code == 0, retrieved.output
    assert "the PACS lists 2 instance(s); 0 were already stored, 2 imported" in retrieved.stdout
    studies = CliRunner().invoke(main, ["studies", "list"])
    [line] = studies.stdout.splitlines()
    assert line in retrieved.stdout.splitlines() and "1 series, 2 instances" in line  # as `studies list` shows it


def test_wrong_credentials_are_one_line_and_store_nothing(db, pacs_env, seeded, monkeypatch):
    Path(pacs_env["MEDVQA_DICOMWEB_PASSWORD_FILE"]).write_text("not-the-password\n")
    for args in (["pacs", "find", "--modality", "CT"], ["pacs", "retrieve", seeded["ct"].study_uid]):
        result = CliRunner().invoke(main, args)
        assert (result.exit_code, result.stdout) == (1, "")
        assert result.stderr == (
            f"medvqa: error: the PACS at {pacs_env['MEDVQA_DICOMWEB_URL']} refused the credentials (HTTP 401): "
            "check MEDVQA_DICOMWEB_USERNAME and the password or token\n"
        )
    with db.read_session() as session:
        assert session.query(Study).count() == 0


def test_a_server_that_is_down_is_one_line_naming_it(db, pacs_env, monkeypatch):
    from tests.pacs_server import free_port

    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    monkeypatch.setenv("MEDVQA_DICOMWEB_URL", url)
    result = CliRunner().invoke(main, ["pacs", "find", "--modality", "CT"])
    assert result.exit_code == 1
    assert result.stderr == f"medvqa: error: cannot reach the PACS at {url}: is it running, and is the URL right?\n"
    monkeypatch.setenv("MEDVQA_DIMSE_PACS", f"ORTHANC@127.0.0.1:{free_port()}")
    result = CliRunner().invoke(main, ["pacs", "find", "--dimse", "--modality", "CT"])
    assert (
        result.exit_code == 1 and result.stderr.startswith("medvqa: error: ") and "ORTHANC@127.0.0.1" in result.stderr
    )


@pytest.fixture
def own_pacs(tmp_path: Path, pacs_server: Orthanc) -> Iterator[Orthanc]:
    """An Orthanc of this test's own, which the test may stop and start again."""
    server = Orthanc(tmp_path / "own-orthanc").start()
    yield server
    server.remove()


def test_a_transfer_cut_by_the_server_keeps_what_was_imported_and_a_rerun_completes_it(
    db, cli_env, own_pacs, clinician, monkeypatch
):
    for key, value in own_pacs.settings_env().items():
        monkeypatch.setenv(key, value)
    study = seed_study(own_pacs, patient_id="CUT-1", accession="CUT-ACC", study_date="20240101", series=2, slices=4)
    monkeypatch.setattr(pacs_service, "BATCH_INSTANCES", 3)

    def stop_after_first_batch(done: int, total: int) -> None:
        if done == 3:
            own_pacs.stop()

    cut = pacs_service.retrieve_study(db, clinician, study.study_uid, _settings(), progress=stop_after_first_batch)
    assert not cut.complete and "cannot reach the PACS" in cut.stopped
    imported = cut.count("imported")  # the first batch, and the second when it was downloaded before the stop
    assert cut.listed == 8 and imported in (3, 6) and cut.not_transferred == 8 - imported
    [failed] = _pacs_events(db, "pacs:study:retrieve")
    assert failed.outcome == "failed" and failed.details["imported"] == imported
    with db.read_session() as session:
        assert session.query(Instance).count() == imported
    own_pacs.start()
    done = pacs_service.retrieve_study(db, clinician, study.study_uid, _settings())
    assert done.complete and (done.already_stored, done.count("imported")) == (imported, 8 - imported)
    with db.read_session() as session:
        assert session.query(Instance).count() == 8 and session.query(Study).count() == 1


@contextlib.contextmanager
def running_listener(db, settings) -> Iterator[None]:
    """`listen` in a thread until the block ends; it imports what it received before it returns."""
    stop, ready = threading.Event(), []
    thread = threading.Thread(
        target=listen,
        args=(db, factories.OPERATOR, settings, stop),
        kwargs={"on_ready": ready.append},
        daemon=True,
    )
    thread.start()
    for _ in range(100):
        if ready or not thread.is_alive():
            break
        threading.Event().wait(0.05)
    assert ready, "the listener did not start"
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_the_pacs_pushes_a_study_to_the_listener(db, pacs_env, seeded, pacs_server):
    settings = _settings()
    with running_listener(db, settings):
        sent = pacs_server.send_to_listener(seeded["mr"].study_uid)
    assert sent["InstancesCount"] == 2 and sent["FailedInstancesCount"] == 0
    with db.read_session() as session:
        assert session.query(Instance).count() == 2
    [received] = [e for e in _pacs_events(db, "pacs:association:receive") if e.outcome == "success"]
    assert received.details["calling_ae"] == "ORTHANC" and received.details["imported"] == 2
    assert not any(Path(settings.home, "spool", "listen").iterdir())


def test_a_calling_ae_title_that_may_not_send_is_rejected_and_audited(db, pacs_env, pacs_server):
    from pynetdicom import AE

    settings = _settings()
    intruder = AE(ae_title="INTRUDER")
    intruder.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
    with running_listener(db, settings):
        assoc = intruder.associate("127.0.0.1", settings.listen_port, ae_title=settings.dimse_ae_title)
        assert assoc.is_rejected
    [denied] = _pacs_events(db, "pacs:association:receive")
    assert denied.outcome == "denied" and denied.details["calling_ae"] == "INTRUDER"
    with db.read_session() as session:
        assert session.query(Study).count() == 0


def test_the_listener_refuses_to_start_without_calling_aes(db, pacs_env, monkeypatch):
    monkeypatch.setenv("MEDVQA_LISTEN_CALLING_AES", "")
    result = CliRunner().invoke(main, ["listen"])
    assert result.exit_code == 1 and "MEDVQA_LISTEN_CALLING_AES is empty" in result.stderr


def test_pacs_settings_are_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDVQA_DIMSE_PACS", "no-port")
    result = CliRunner().invoke(main, ["pacs", "find", "--dimse", "--modality", "CT"])
    assert result.exit_code == 1 and result.stderr.startswith("medvqa: error: MEDVQA_DIMSE_PACS: ")
    monkeypatch.delenv("MEDVQA_DIMSE_PACS")
    monkeypatch.delenv("MEDVQA_DICOMWEB_URL", raising=False)
    with pytest.raises(Exception, match="MEDVQA_DICOMWEB_URL is not set"):
        pacs_service.connect(load_settings(home=tmp_path), "dicomweb")


@contextlib.contextmanager
def https_dicomweb(folder: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS DICOMweb endpoint with a self-signed certificate for 127.0.0.1 (openssl) that finds no study.
    (Debian's Orthanc 1.10 exits on its first HTTPS connection with this OpenSSL, so TLS is tried on this.)"""
    import http.server
    import ssl
    import subprocess

    from tests.pacs_server import free_port

    certificate, key = folder / "certificate.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(certificate),
        ],
        check=True,
        capture_output=True,
    )

    class NoStudies(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), NoStudies)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/dicom-web", certificate
    finally:
        server.shutdown()
        server.server_close()


def test_tls_is_verified_and_a_ca_bundle_lets_a_private_ca_through(db, cli_env, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVQA_DICOMWEB_RETRIES", "0")
    with https_dicomweb(tmp_path) as (url, certificate):
        monkeypatch.setenv("MEDVQA_DICOMWEB_URL", url)
        refused = CliRunner().invoke(main, ["pacs", "find", "--modality", "CT"])
        assert (refused.exit_code, refused.stdout) == (1, "")
        assert refused.stderr == (
            f"medvqa: error: the PACS at {url} failed TLS verification: set MEDVQA_DICOMWEB_CA_BUNDLE to the CA "
            "that signed it\n"
        )
        monkeypatch.setenv("MEDVQA_DICOMWEB_CA_BUNDLE", str(certificate))
        found = CliRunner().invoke(main, ["pacs", "find", "--modality", "CT"])
        assert (found.exit_code, found.stdout) == (0, "0 study(ies)\n"), found.output
        monkeypatch.setenv("MEDVQA_DICOMWEB_CA_BUNDLE", str(tmp_path / "missing.pem"))
        missing = CliRunner().invoke(main, ["pacs", "find", "--modality", "CT"])
        assert missing.stderr.startswith("medvqa: error: MEDVQA_DICOMWEB_CA_BUNDLE: no such file")


def test_listen_stops_on_sigterm_after_importing_what_it_received(db, pacs_env, seeded, pacs_server):
    """`medvqa listen` as the service runs it: one log line per association, a clean exit on SIGTERM."""
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "medvqa.cli", "listen"], env=pacs_env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                sent = pacs_server.send_to_listener(seeded["ct"].study_uid)
                break
            except Exception:  # not listening yet
                time.sleep(0.2)
        assert sent["InstancesCount"] == 6 and sent["FailedInstancesCount"] == 0
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, log
    lines = [line for line in log.splitlines() if "association from" in line]
    assert len(lines) == 1 and "ORTHANC@127.0.0.1: 6 received, 6 imported" in lines[0]
    assert "Traceback" not in log and seeded["ct"].patient_id not in log
    with db.read_session() as session:
        assert session.query(Instance).count() == 6


def test_a_spool_left_by_a_killed_listener_is_imported_at_the_next_start(db, pacs_env):
    from tests import hostile_inputs

    settings = _settings()
    spool = Path(settings.home, "spool", "listen", "left-by-a-killed-listener")
    spool.mkdir(parents=True)
    (spool / "sender.json").write_text(json.dumps({"ae_title": "CT1", "host": "10.0.0.7"}))
    for index in range(2):
        (spool / f"{index + 1:06d}.dcm").write_bytes(hostile_inputs.valid_dicom(index))
    with running_listener(db, settings):
        pass
    with db.read_session() as session:
        assert session.query(Instance).count() == 2
    [received] = _pacs_events(db, "pacs:association:receive")
    assert (received.details["calling_ae"], received.details["host"], received.details["imported"]) == (
        "CT1",
        "10.0.0.7",
        2,
    )
    assert not spool.exists()
