"""A real PACS for tests: Debian's Orthanc with its DICOMweb plugin, started on free loopback ports from a
generated configuration, seeded with synthetic studies (fake PHI included) made with pydicom.

Orthanc 1.10 cannot choose the address it binds; the configuration keeps it to this machine all the same: HTTP
refuses remote clients (RemoteAccessAllowed false) and needs a generated password, and DICOM accepts only the
modalities it declares (medvqa's listener and client, on 127.0.0.1, host checked). Tests stop it.
"""

from __future__ import annotations

import io
import json
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import requests
from pydicom.uid import generate_uid

from tests.dicom_factory import make_slice

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
PACS_AE = "ORTHANC"
CLIENT_AE = "MEDVQA"


def missing() -> str:
    """Why Orthanc cannot run here ('' when it can)."""
    if not ORTHANC.exists() or not DICOMWEB_PLUGIN.exists():
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb, as .ci/run does)"
    return ""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Orthanc:
    folder: Path
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    listener_port: int = field(default_factory=free_port)  # where medvqa's listener is declared as a modality
    user: str = "medvqa-test"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def dimse(self) -> str:
        return f"{PACS_AE}@127.0.0.1:{self.dicom_port}"

    def settings_env(self) -> dict[str, str]:
        """The MEDVQA_* settings that point medvqa at this PACS."""
        secret = self.folder / "pacs-password"
        secret.write_text(self.password + "\n")
        secret.chmod(0o600)
        return {
            "MEDVQA_DICOMWEB_URL": self.dicomweb_url,
            "MEDVQA_DICOMWEB_USERNAME": self.user,
            "MEDVQA_DICOMWEB_PASSWORD_FILE": str(secret),
            "MEDVQA_DICOMWEB_RETRIES": "0",
            "MEDVQA_DICOMWEB_TIMEOUT_S": "20",
            "MEDVQA_DIMSE_PACS": self.dimse,
            "MEDVQA_DIMSE_AE_TITLE": CLIENT_AE,
            "MEDVQA_LISTEN_PORT": str(self.listener_port),
            "MEDVQA_LISTEN_CALLING_AES": f"{PACS_AE}@127.0.0.1",
        }

    def start(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "medvqa-test-pacs",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": PACS_AE,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {"medvqa": [CLIENT_AE, "127.0.0.1", self.listener_port]},
            "DicomCheckModalityHost": True,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomScuTimeout": 10,
            "StorageCompression": False,
            "HttpCompressionEnabled": False,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        log = (self.folder / "orthanc.log").open("ab")
        self.process = subprocess.Popen([str(ORTHANC), str(path)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/system", auth=(self.user, self.password), timeout=1).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("Orthanc did not start within 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        response = requests.request(method, f"{self.url}{path}", auth=(self.user, self.password), timeout=30, **kwargs)
        response.raise_for_status()
        return response

    def upload(self, dataset: pydicom.Dataset) -> None:
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        self.request("POST", "/instances", data=buffer.getvalue())

    def orthanc_study_id(self, study_uid: str) -> str:
        found = self.request("POST", "/tools/lookup", data=study_uid).json()
        return next(item["ID"] for item in found if item["Type"] == "Study")

    def send_to_listener(self, study_uid: str) -> dict[str, Any]:
        """Orthanc pushes the study to medvqa's listener (C-STORE, as a PACS routing rule would)."""
        body = json.dumps({"Resources": [self.orthanc_study_id(study_uid)], "Synchronous": True})
        return dict(self.request("POST", "/modalities/medvqa/store", data=body).json())


@dataclass(frozen=True)
class SeededStudy:
    study_uid: str
    series_uids: tuple[str, ...]
    patient_id: str
    patient_name: str
    accession: str
    study_date: str
    modality: str
    instances: int


def seed_study(
    server: Orthanc,
    *,
    patient_id: str,
    accession: str,
    study_date: str,
    modality: str = "CT",
    series: int = 2,
    slices: int = 3,
    description: str = "Synthetic study",
    size: int = 32,
) -> SeededStudy:
    """Upload a synthetic study (fake PHI in the patient fields) and return what identifies it."""
    study_uid = generate_uid()
    series_uids = tuple(generate_uid() for _ in range(series))
    name = f"Test^{patient_id.replace('-', '')}"
    for number, series_uid in enumerate(series_uids, start=1):
        for index in range(slices):
            pixels = (np.arange(size * size, dtype=np.uint16).reshape(size, size) * (index + number)) % 4000
            dataset = make_slice(
                pixels=pixels,
                position=(0.0, 0.0, float(index)),
                instance_number=index + 1,
                modality=modality,
                series_uid=series_uid,
                StudyInstanceUID=study_uid,
                PatientID=patient_id,
                PatientName=name,
                AccessionNumber=accession,
                StudyDate=study_date,
                StudyDescription=description,
                SeriesNumber=number,
                BurnedInAnnotation="NO",
            )
            server.upload(dataset)
    return SeededStudy(study_uid, series_uids, patient_id, name, accession, study_date, modality, series * slices)
