"""A PACS over DIMSE (pynetdicom): C-FIND and C-GET as a client, and a C-STORE listener.

The client (`DimsePacs`) searches a PACS named by MEDVQA_DIMSE_PACS ('AE@host:port') at study level, lists a
study's instances (series then image level, as the Study Root model asks), and retrieves them with C-GET on one
association (no need for the PACS to know medvqa as a move destination). Instances arrive as their encoded bytes,
never decoded here: the import path reads them with its own checks.

The listener (`StorageListener`) accepts C-ECHO and C-STORE for the image storage classes medvqa can render, in
the transfer syntaxes it can decode, from the calling AE titles (and hosts) that MEDVQA_LISTEN_CALLING_AES names;
every other association is rejected. What it receives is written to a spool folder before success is answered,
so nothing acknowledged is lost; the caller imports each association's spool when the association ends.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medvqa.errors import ConfigError, PacsError
from medvqa.pacs.query import Fetched, PacsStudy, RemoteInstance, StudyQuery

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pynetdicom.association import Association
    from pynetdicom.events import Event

    from medvqa.config import Settings

log = logging.getLogger(__name__)
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"  # Study Root Query/Retrieve Information Model - GET
VERIFICATION = "1.2.840.10008.1.1"
NATIVE_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")
SENDER_FILE = "sender.json"  # in each spool folder: who sent it, for a spool imported after a restart
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_REFUSED = 0xA900  # Error: data set does not match SOP class (used for what this listener may not take)
_PEER = re.compile(r"^(?P<ae>[^@\\]{1,16})@(?P<host>[\w.\-\[\]:]+):(?P<port>\d{1,5})$")


def transfer_syntaxes() -> list[str]:
    """The transfer syntaxes whose pixel data medvqa decodes here: native ones, and the compressed ones that a
    pydicom decoder with an installed plugin (pylibjpeg) handles."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import UID

    compressed = [
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.5",
    ]
    available = []
    for syntax in compressed:
        try:
            if get_decoder(UID(syntax)).is_available:
                available.append(syntax)
        except (NotImplementedError, ValueError):
            continue
    return [*NATIVE_SYNTAXES, *available]


def storage_classes() -> list[str]:
    from medvqa.imaging.sop_classes import RENDERABLE_IMAGE_CLASSES

    return sorted(RENDERABLE_IMAGE_CLASSES)


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, variable: str) -> Peer:
        match = _PEER.match(text.strip())
        if not match:
            raise ConfigError(f"{variable}: 'AE_TITLE@host:port', e.g. ORTHANC@pacs.example:4242")
        return cls(match["ae"], match["host"].strip("[]"), int(match["port"]))


class DimsePacs:
    """C-FIND and C-GET against the PACS that MEDVQA_DIMSE_PACS names."""

    def __init__(self, settings: Settings) -> None:
        if not settings.dimse_pacs:
            raise ConfigError("MEDVQA_DIMSE_PACS is not set: name the PACS as 'AE_TITLE@host:port'")
        self.peer = Peer.parse(settings.dimse_pacs, "MEDVQA_DIMSE_PACS")
        self.ae_title = settings.dimse_ae_title
        self.timeout = settings.dimse_timeout_s
        self.max_bytes = settings.import_max_file_bytes
        self.where = f"{self.peer.ae_title}@{self.peer.host}:{self.peer.port}"

    def close(self) -> None:
        """Every request opens and releases its own association: nothing stays open."""

    def find_studies(self, query: StudyQuery) -> list[PacsStudy]:
        from pydicom.dataset import Dataset

        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = ""
        identifier.StudyDate = query.dicom_date_range or ""
        identifier.ModalitiesInStudy = query.modality or ""
        identifier.StudyDescription = ""
        identifier.NumberOfStudyRelatedInstances = ""
        identifier.PatientID = query.patient_id or ""
        identifier.AccessionNumber = query.accession or ""
        studies = []
        for found in self._find(identifier, query.limit):
            studies.append(_study(found, self.where))
        return studies

    def list_instances(self, study_uid: str, series_uid: str | None = None) -> list[RemoteInstance]:
        from pydicom.dataset import Dataset

        if series_uid:
            series = [(series_uid, 0)]
        else:
            query = Dataset()
            query.QueryRetrieveLevel = "SERIES"
            query.StudyInstanceUID = study_uid
            query.SeriesInstanceUID = ""
            query.SeriesNumber = ""
            series = [(str(s.SeriesInstanceUID), _int(s.get("SeriesNumber"))) for s in self._find(query, 10_000)]
        instances: list[RemoteInstance] = []
        for uid, number in series:
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = study_uid
            query.SeriesInstanceUID = uid
            query.SOPInstanceUID = ""
            query.InstanceNumber = ""
            for found in self._find(query, 100_000):
                sop = str(found.get("SOPInstanceUID", "") or "")
                if sop:
                    instances.append(RemoteInstance(study_uid, uid, sop, number, _int(found.get("InstanceNumber"))))
        unique = {i.sop_uid: i for i in instances}.values()
        return sorted(unique, key=lambda i: (i.series_number, i.series_uid, i.number))

    def fetch_many(self, instances: list[RemoteInstance]) -> list[Fetched]:
        """C-GET each instance on one association; the PACS's C-STOREs arrive on it and are kept as bytes."""
        from pydicom.dataset import Dataset
        from pynetdicom import evt

        received: dict[str, Fetched] = {}

        def on_store(event: Event) -> int:
            sop = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
            data = event.encoded_dataset()
            if len(data) > self.max_bytes:
                received[sop] = Fetched(b"", f"more than {self.max_bytes} bytes (MEDVQA_IMPORT_MAX_FILE_BYTES)")
            else:
                received[sop] = Fetched(data)
            return 0x0000

        with self._association(get=True, handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
            for instance in instances:
                identifier = Dataset()
                identifier.QueryRetrieveLevel = "IMAGE"
                identifier.StudyInstanceUID = instance.study_uid
                identifier.SeriesInstanceUID = instance.series_uid
                identifier.SOPInstanceUID = instance.sop_uid
                for status, _ in assoc.send_c_get(identifier, STUDY_GET):
                    code = int(getattr(status, "Status", -1)) if status else -1
                    if code == -1:
                        raise PacsError(f"the PACS at {self.where} stopped answering during C-GET")
                    if code not in (0x0000, 0xFF00, 0xFF01, 0xB000):
                        raise PacsError(f"the PACS at {self.where} refused C-GET (status 0x{code:04X})")
        missing = [i for i in instances if i.sop_uid not in received]
        if missing:
            raise PacsError(f"the PACS at {self.where} did not send {len(missing)} of the instances asked for")
        return [received[i.sop_uid] for i in instances]

    def _find(self, identifier: Dataset, limit: int) -> Iterator[Dataset]:
        count = 0
        with self._association(get=False) as assoc:
            for status, found in assoc.send_c_find(identifier, STUDY_FIND):
                code = int(getattr(status, "Status", -1)) if status else -1
                if code == -1:
                    raise PacsError(f"the PACS at {self.where} stopped answering during C-FIND")
                if code in (0xFF00, 0xFF01) and found is not None:
                    count += 1
                    if count <= limit:
                        yield found
                elif code != 0x0000:
                    raise PacsError(f"the PACS at {self.where} refused C-FIND (status 0x{code:04X})")

    def _association(self, *, get: bool, handlers: list[Any] | None = None) -> _Associated:
        from pynetdicom import AE, build_role

        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        roles: list[Any] = []
        if get:
            ae.add_requested_context(STUDY_GET)
            syntaxes = transfer_syntaxes()
            for sop_class in storage_classes()[:120]:
                ae.add_requested_context(sop_class, syntaxes)
                roles.append(build_role(sop_class, scp_role=True))
        else:
            ae.add_requested_context(STUDY_FIND)
        try:
            assoc = ae.associate(
                self.peer.host,
                self.peer.port,
                ae_title=self.peer.ae_title,
                ext_neg=roles or None,
                evt_handlers=handlers or None,
            )
        except (OSError, ValueError) as exc:
            raise PacsError(f"cannot reach the PACS at {self.where}: {type(exc).__name__}") from None
        if not assoc.is_established:
            reason = "rejected the association" if assoc.is_rejected else "cannot be reached"
            raise PacsError(f"the PACS at {self.where} {reason}: check MEDVQA_DIMSE_PACS and medvqa's AE title")
        return _Associated(assoc)


class _Associated:
    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc

    def __enter__(self) -> Association:
        return self.assoc

    def __exit__(self, *exc: object) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _study(found: Dataset, where: str) -> PacsStudy:
    from datetime import datetime

    uid = str(found.get("StudyInstanceUID", "") or "")
    if not uid:
        raise PacsError(f"the PACS at {where} returned a study without a Study Instance UID")
    raw = str(found.get("StudyDate", "") or "")
    try:
        study_date = datetime.strptime(raw[:8], "%Y%m%d").date() if raw else None
    except ValueError:
        study_date = None
    modalities = found.get("ModalitiesInStudy", "") or ""
    listed = [str(m)[:16] for m in (modalities if isinstance(modalities, list | tuple) else [modalities]) if m]
    description = "".join(ch for ch in str(found.get("StudyDescription", "") or "") if ch.isprintable())[:64]
    count = found.get("NumberOfStudyRelatedInstances")
    return PacsStudy(uid, study_date, tuple(listed), description, _int(count) if count not in (None, "") else None)


# --- the listener -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallingAE:
    """An AE title that may send, optionally only from one host."""

    ae_title: str
    host: str | None = None

    def allows(self, ae_title: str, host: str) -> bool:
        return ae_title == self.ae_title and (self.host is None or host == self.host)


def parse_calling_aes(text: str) -> list[CallingAE]:
    """'MODALITY1, PACS@10.0.0.5' -> the titles (and hosts) MEDVQA_LISTEN_CALLING_AES allows."""
    allowed = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        title, _, host = entry.partition("@")
        title = title.strip()
        if not 1 <= len(title) <= 16 or "\\" in title or not title.isprintable():
            raise ConfigError(f"MEDVQA_LISTEN_CALLING_AES: {entry[:40]!r} is not an AE title (1-16 characters)")
        allowed.append(CallingAE(title, host.strip() or None))
    return allowed


@dataclass
class Delivery:
    """One association the listener accepted, and the spool folder its instances were written to."""

    ae_title: str
    host: str
    spool: Path
    received: int = 0
    refused: list[str] = field(default_factory=list)

    @classmethod
    def left_over(cls, spool: Path) -> Delivery:
        """A spool a stopped listener left, with its sender when it was recorded."""
        try:
            sender = json.loads((spool / SENDER_FILE).read_text())
            ae_title, host = str(sender["ae_title"]), str(sender["host"])
        except (OSError, ValueError, KeyError, TypeError):
            ae_title, host = "(unknown)", ""
        return cls(ae_title, host, spool, len(list(spool.glob("*.dcm"))))


DeliveryDone = Callable[[Delivery], None]
DeliveryDenied = Callable[[str, str, str], None]  # (calling AE title, host, reason)


class StorageListener:
    """A Storage SCP (C-STORE, C-ECHO). `on_done` runs (in the listener's import thread) for each association
    that ended, with its spool folder; `on_denied` for each association refused. Stop with `stop()`."""

    def __init__(
        self,
        settings: Settings,
        spool_root: Path,
        on_done: DeliveryDone,
        on_denied: DeliveryDenied,
        port: int | None = None,
        ae_title: str | None = None,
    ) -> None:
        self.allowed = parse_calling_aes(settings.listen_calling_aes)
        if not self.allowed:
            raise ConfigError(
                "MEDVQA_LISTEN_CALLING_AES is empty: name the AE titles that may send (e.g. ORTHANC or CT1@10.0.0.5)"
            )
        self.address = settings.listen_address
        self.port = settings.listen_port if port is None else port
        self.ae_title = ae_title or settings.dimse_ae_title
        self.max_bytes = settings.import_max_file_bytes
        self.timeout = settings.dimse_timeout_s
        self.spool_root = spool_root
        self.on_done = on_done
        self.on_denied = on_denied
        self._associations: dict[int, Delivery] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    def start(self) -> None:
        """Start listening (in background threads) and return."""
        from pynetdicom import AE, evt

        self.spool_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.require_calling_aet = sorted({entry.ae_title for entry in self.allowed})
        ae.require_called_aet = True
        syntaxes = transfer_syntaxes()
        ae.add_supported_context(VERIFICATION)
        for sop_class in storage_classes():
            ae.add_supported_context(sop_class, syntaxes)
        handlers: list[Any] = [
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_ESTABLISHED, self._established),
            (evt.EVT_C_ECHO, self._echo),
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_RELEASED, self._ended),
            (evt.EVT_ABORTED, self._ended),
            (evt.EVT_CONN_CLOSE, self._ended),
        ]
        try:
            self._server = ae.start_server((self.address, self.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise PacsError(f"cannot listen on {self.address}:{self.port}: {exc.strerror or exc}") from None

    @property
    def bound_port(self) -> int:
        return int(self._server.server_address[1]) if self._server else self.port

    def stop(self) -> None:
        """Stop accepting; running associations end; their spools are handed over."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        with self._lock:
            left = list(self._associations.values())
            self._associations.clear()
        for association in left:
            self.on_done(association)

    # Handlers run in each association's own thread.

    def _rejected(self, event: Event) -> None:
        requestor = event.assoc.requestor
        self.on_denied(str(requestor.ae_title).strip(), str(requestor.address), "calling AE title not allowed")

    def _established(self, event: Event) -> None:
        ae_title, host = str(event.assoc.requestor.ae_title).strip(), str(event.assoc.requestor.address)
        if not any(entry.allows(ae_title, host) for entry in self.allowed):
            self.on_denied(ae_title, host, "calling AE title not allowed from this host")
            event.assoc.abort()
            return
        spool = self.spool_root / f"{uuid.uuid4().hex}"
        spool.mkdir(mode=0o700)
        (spool / SENDER_FILE).write_text(json.dumps({"ae_title": ae_title, "host": host}))
        with self._lock:
            self._associations[id(event.assoc)] = Delivery(ae_title, host, spool)

    def _association(self, event: Event) -> Delivery | None:
        with self._lock:
            return self._associations.get(id(event.assoc))

    def _echo(self, event: Event) -> int:
        return 0x0000 if self._association(event) is not None else STATUS_REFUSED

    def _store(self, event: Event) -> int:
        association = self._association(event)
        if association is None:
            return STATUS_REFUSED
        data = event.encoded_dataset()
        if len(data) > self.max_bytes:
            association.refused.append(f"more than {self.max_bytes} bytes (MEDVQA_IMPORT_MAX_FILE_BYTES)")
            return STATUS_OUT_OF_RESOURCES
        association.received += 1
        path = association.spool / f"{association.received:06d}.dcm"
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())  # acknowledged only once it is on disk
        except OSError:
            association.received -= 1
            return STATUS_OUT_OF_RESOURCES
        return 0x0000

    def _ended(self, event: Event) -> None:
        with self._lock:
            association = self._associations.pop(id(event.assoc), None)
        if association is not None:
            self.on_done(association)
