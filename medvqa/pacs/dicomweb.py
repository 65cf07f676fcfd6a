"""A PACS over DICOMweb: QIDO-RS study and instance searches (dicomweb-client), WADO-RS instance downloads.

Searches go through the maintained `dicomweb-client`. Instances are downloaded one request each, on the same
session, and read with a hard cap (MEDVQA_IMPORT_MAX_FILE_BYTES): the bytes go to the import path unparsed, so
the checks that guard file imports (declared lengths, decompression bombs, SOP classes) guard the PACS too.
Authentication (basic or bearer) comes from settings or secrets files, never the command line; TLS is verified
by default; every request has a timeout, and connection errors and 429/5xx answers are retried with backoff.
Errors are one PacsError line naming the PACS's URL and what to check, never a patient identifier.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from medvqa.errors import ConfigError, PacsError
from medvqa.pacs.query import Fetched, PacsStudy, RemoteInstance, StudyQuery

if TYPE_CHECKING:
    from pathlib import Path

    import requests

    from medvqa.config import Settings

DICOM_PART = 'multipart/related; type="application/dicom"; transfer-syntax=*'
PART_HEADROOM = 64 << 10  # multipart boundary and part headers around one instance
STUDY_FIELDS = ("StudyDate", "ModalitiesInStudy", "StudyDescription", "NumberOfStudyRelatedInstances")
RETRY_STATUSES = (429, 500, 502, 503, 504)


class DicomWeb:
    """One PACS's DICOMweb service, from MEDVQA_DICOMWEB_* settings. Use as a context manager."""

    def __init__(self, settings: Settings) -> None:
        if not settings.dicomweb_url:
            raise ConfigError("MEDVQA_DICOMWEB_URL is not set: name the PACS's DICOMweb root (http://pacs/dicom-web)")
        self.url = settings.dicomweb_url.rstrip("/")
        self.max_bytes = settings.import_max_file_bytes
        self.timeout = settings.dicomweb_timeout_s
        self.session = _session(settings)

    def __enter__(self) -> DicomWeb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    def find_studies(self, query: StudyQuery) -> list[PacsStudy]:
        """QIDO-RS studies matching the query, at most query.limit, as the PACS returns them."""
        found = self._qido(
            lambda client: client.search_for_studies(
                search_filters=query.qido_filters(), fields=list(STUDY_FIELDS), limit=query.limit
            )
        )
        return [_study(item) for item in found[: query.limit]]

    def list_instances(self, study_uid: str, series_uid: str | None = None) -> list[RemoteInstance]:
        """Every instance of the study (or of one of its series), ordered by series then instance number."""
        found = self._qido(
            lambda client: client.search_for_instances(
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                fields=["InstanceNumber", "SeriesNumber"],
                get_remaining=True,
            )
        )
        instances = [_instance(item, study_uid) for item in found]
        unique = {i.sop_uid: i for i in instances}.values()
        return sorted(unique, key=lambda i: (i.series_number, i.series_uid, i.number))

    def fetch_many(self, instances: list[RemoteInstance]) -> list[Fetched]:
        return [self.fetch(instance) for instance in instances]

    def fetch(self, instance: RemoteInstance) -> Fetched:
        """WADO-RS: the instance's Part 10 bytes as stored by the PACS (any transfer syntax), read with the cap."""
        study, series, sop = (quote(u, safe=".") for u in (instance.study_uid, instance.series_uid, instance.sop_uid))
        url = f"{self.url}/studies/{study}/series/{series}/instances/{sop}"
        headers = {"Accept": DICOM_PART, "Accept-Encoding": "identity"}
        try:
            with self.session.get(url, headers=headers, stream=True) as response:
                _raise_for_status(response, self.url)
                declared = int(response.headers.get("Content-Length") or 0)
                if declared > self.max_bytes + PART_HEADROOM:
                    return Fetched(b"", _too_large(self.max_bytes))
                body = bytearray()
                for chunk in response.iter_content(1 << 20):
                    body += chunk
                    if len(body) > self.max_bytes + PART_HEADROOM:
                        return Fetched(b"", _too_large(self.max_bytes))
                return Fetched(_single_part(bytes(body), response.headers.get("Content-Type", ""), self.url))
        except PacsError:
            raise
        except Exception as exc:
            raise _transport_error(exc, self.url) from None

    def _qido(self, call: Any) -> list[dict[str, Any]]:
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(self.url, session=self.session, timeout=self.timeout)
        client.set_http_retry_params(retry=False)  # the session retries (MEDVQA_DICOMWEB_RETRIES), not on TLS errors
        try:
            return list(call(client) or [])
        except Exception as exc:
            raise _transport_error(exc, self.url) from None


def _too_large(limit: int) -> str:
    return f"more than {limit} bytes (MEDVQA_IMPORT_MAX_FILE_BYTES)"


def _session(settings: Settings) -> requests.Session:
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    class TimedSession(requests.Session):
        def request(self, *args: Any, **kwargs: Any) -> requests.Response:
            kwargs.setdefault("timeout", settings.dicomweb_timeout_s)
            # Explicit, so that REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the environment cannot replace the setting.
            kwargs.setdefault("verify", self.verify)
            return super().request(*args, **kwargs)

        def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
            # QIDO wildcards: RFC 3986 allows * and ? unescaped in a query, and some servers (Orthanc 1.10)
            # match the escaped forms literally.
            if request.url and "?" in request.url:
                path, _, query = request.url.partition("?")
                request.url = f"{path}?{query.replace('%2A', '*').replace('%3F', '?')}"
            return super().send(request, **kwargs)

    session = TimedSession()
    retry = Retry(
        total=settings.dicomweb_retries,
        backoff_factor=0.5,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET"}),
        raise_on_status=False,
    )
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.verify = str(settings.dicomweb_ca_bundle) if settings.dicomweb_ca_bundle else settings.dicomweb_verify_tls
    if settings.dicomweb_ca_bundle and not settings.dicomweb_ca_bundle.is_file():
        raise ConfigError(f"MEDVQA_DICOMWEB_CA_BUNDLE: no such file: {settings.dicomweb_ca_bundle}")
    token = _secret(settings, "token")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif settings.dicomweb_username:
        password = _secret(settings, "password")
        if password is None:
            raise ConfigError("MEDVQA_DICOMWEB_USERNAME is set without MEDVQA_DICOMWEB_PASSWORD(_FILE)")
        session.auth = (settings.dicomweb_username, password)
    return session


def _secret(settings: Settings, name: str) -> str | None:
    """The secret from its setting, else the first line of its file; None when neither is set."""
    value = getattr(settings, f"dicomweb_{name}")
    if value is not None:
        return str(value.get_secret_value())
    path: Path | None = getattr(settings, f"dicomweb_{name}_file")
    if path is None:
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeError) as exc:
        variable = f"MEDVQA_DICOMWEB_{name.upper()}_FILE"
        raise ConfigError(f"{variable}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not lines or not lines[0].strip():
        raise ConfigError(f"MEDVQA_DICOMWEB_{name.upper()}_FILE: {path} is empty")
    return lines[0].strip()


def _raise_for_status(response: requests.Response, url: str) -> None:
    status = response.status_code
    if status < 400:
        return
    if status in (401, 403):
        raise PacsError(
            f"the PACS at {url} refused the credentials (HTTP {status}): check MEDVQA_DICOMWEB_USERNAME and the "
            "password or token"
        )
    if status == 404:
        raise PacsError(f"the PACS at {url} does not have it (HTTP 404)")
    raise PacsError(f"the PACS at {url} answered HTTP {status}")


def _transport_error(exc: Exception, url: str) -> PacsError:
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        try:
            _raise_for_status(exc.response, url)
        except PacsError as error:
            return error
    if isinstance(exc, requests.exceptions.SSLError):
        return PacsError(
            f"the PACS at {url} failed TLS verification: set MEDVQA_DICOMWEB_CA_BUNDLE to the CA that signed it"
        )
    if isinstance(exc, requests.Timeout):
        return PacsError(f"the PACS at {url} did not answer in time (MEDVQA_DICOMWEB_TIMEOUT_S)")
    if isinstance(exc, requests.exceptions.RetryError):
        return PacsError(f"the PACS at {url} kept failing after MEDVQA_DICOMWEB_RETRIES retries")
    if isinstance(exc, requests.ConnectionError):
        return PacsError(f"cannot reach the PACS at {url}: is it running, and is the URL right?")
    if isinstance(exc, ValueError | KeyError | TypeError):
        return PacsError(f"the PACS at {url} sent an answer that is not valid DICOMweb ({type(exc).__name__})")
    return PacsError(f"the PACS at {url} failed: {type(exc).__name__}")


def _single_part(body: bytes, content_type: str, url: str) -> bytes:
    """The one DICOM part of a WADO-RS answer for one instance (a bare application/dicom body is accepted)."""
    media, _, parameters = content_type.partition(";")
    media = media.strip().lower()
    if media == "application/dicom":
        return body
    match = re.search(r'boundary="?([^";]+)"?', parameters)
    if media != "multipart/related" or not match:
        raise PacsError(f"the PACS at {url} answered {media or 'no content type'}, not multipart/related DICOM")
    marker = b"--" + match.group(1).strip().encode("latin-1")
    start = body.find(marker)
    header_end = body.find(b"\r\n\r\n", start) if start >= 0 else -1
    end = body.find(b"\r\n" + marker, header_end + 4) if header_end >= 0 else -1
    if end < 0:
        raise PacsError(f"the PACS at {url} sent a cut or malformed multipart answer")
    return body[header_end + 4 : end]


def _value(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _text(item: dict[str, Any], tag: str, limit: int = 64) -> str:
    value = _value(item, tag)
    text = "" if value is None else str(value)
    return "".join(ch for ch in text if ch.isprintable())[:limit]


def _number(item: dict[str, Any], tag: str) -> int | None:
    try:
        return int(_value(item, tag))
    except (TypeError, ValueError):
        return None


def _study(item: dict[str, Any]) -> PacsStudy:
    uid = _text(item, "0020000D")
    if not uid:
        raise PacsError("the PACS returned a study without a Study Instance UID")
    raw_date = _text(item, "00080020", 8)
    try:
        study_date: date | None = datetime.strptime(raw_date, "%Y%m%d").date() if raw_date else None
    except ValueError:
        study_date = None
    modalities = [str(m)[:16] for m in ((item.get("00080061") or {}).get("Value") or []) if m]
    return PacsStudy(
        study_uid=uid,
        study_date=study_date,
        modalities=tuple(modalities),
        description=_text(item, "00081030"),
        instances=_number(item, "00201208"),
    )


def _instance(item: dict[str, Any], study_uid: str) -> RemoteInstance:
    series_uid, sop_uid = _text(item, "0020000E"), _text(item, "00080018")
    if not series_uid or not sop_uid:
        raise PacsError("the PACS listed an instance without its series or SOP Instance UID")
    return RemoteInstance(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        series_number=_number(item, "00200011") or 0,
        number=_number(item, "00200013") or 0,
    )
