"""DICOMweb: a series in with WADO-RS, a series out with STOW-RS, a study's series with QIDO-RS.

A DICOMweb address is the service's base URL followed by `/studies/STUDY` (a study) and
optionally `/series/SERIES` (one series), e.g.
`https://pacs.example.org/dicom-web/studies/1.2.3/series/1.2.3.4`.

Credentials (never in the URL, never on the command line, never printed), first found wins:
`MEDSR_DICOMWEB_TOKEN` (HTTP bearer), `MEDSR_DICOMWEB_USER` + `MEDSR_DICOMWEB_PASSWORD` (HTTP
basic), the server's `machine` entry of the netrc file `$NETRC` (default `~/.netrc`). TLS
certificates are verified (requests' CA bundle; `REQUESTS_CA_BUNDLE` names a hospital CA).
"""

from __future__ import annotations

import contextlib
import math
import netrc
import os
import re
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .errors import PacsError, require

__all__ = ["DicomwebAddress", "parse_address", "fetched_series", "check_series_request",
           "download_series", "series_urls", "store_series", "StoreReport",
           "partial_store_message", "ENV_TOKEN", "ENV_USER", "ENV_PASSWORD"]

ENV_TOKEN, ENV_USER, ENV_PASSWORD = ("MEDSR_DICOMWEB_TOKEN", "MEDSR_DICOMWEB_USER",
                                     "MEDSR_DICOMWEB_PASSWORD")
#: Series of these modalities hold no image volume; a study URL skips them.
NON_IMAGE_MODALITIES = frozenset({"SR", "PR", "KO", "SEG", "REG", "RTSTRUCT", "RTPLAN",
                                  "RTDOSE", "RTRECORD", "DOC", "AU", "ECG", "FID", "PLAN"})
#: Attempts per HTTP request (transient server errors are retried with a short backoff).
HTTP_ATTEMPTS = 3
#: Instances per STOW-RS request (one multipart message is held in memory).
STOW_INSTANCES_PER_REQUEST = 16
#: Free disk space kept beyond a download's own size.
DISK_RESERVE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class DicomwebAddress:
    """A DICOMweb service (`base_url`, no credentials), and a study and series in it."""

    base_url: str
    study_uid: str | None = None
    series_uid: str | None = None

    @property
    def url(self) -> str:
        """The address as a URL (safe to print: it never holds credentials)."""
        url = self.base_url
        if self.study_uid:
            url += f"/studies/{self.study_uid}"
            if self.series_uid:
                url += f"/series/{self.series_uid}"
        return url


_UID = r"[0-9]+(?:\.[0-9]+)*"
_STUDY_SERIES = re.compile(rf"/studies/({_UID})(?:/series/({_UID}))?$")


def parse_address(url: str) -> DicomwebAddress:
    """The service, study and series a DICOMweb URL names; PacsError for a URL that holds
    credentials (they are not echoed), a query or fragment, or a scheme other than http(s)."""
    parts = urllib.parse.urlsplit(url.strip())
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    shown = f"{parts.scheme}://{host}{port}{parts.path}"
    if parts.username is not None or parts.password is not None:
        raise PacsError(f"{shown}: a DICOMweb URL must not hold a user name or password; put "
                        f"them in a netrc file or {ENV_USER}/{ENV_PASSWORD} ({ENV_TOKEN} for a "
                        "bearer token)")
    if parts.scheme not in ("http", "https") or not host:
        raise PacsError(f"{shown}: not an http(s) DICOMweb URL")
    if parts.query or parts.fragment:
        raise PacsError(f"{shown}: a DICOMweb series URL has no query (?...) or fragment (#...)")
    path = parts.path.rstrip("/")
    match = _STUDY_SERIES.search(path)
    base_path = path[: match.start()] if match else path
    base = f"{parts.scheme}://{parts.netloc}{base_path}"
    if match is None:
        if "/studies" in path or "/series" in path:
            raise PacsError(f"{shown}: expected BASE/studies/STUDY_UID[/series/SERIES_UID] with "
                            "numeric dotted UIDs")
        return DicomwebAddress(base)
    return DicomwebAddress(base, match.group(1), match.group(2))


# --- credentials and HTTP errors ------------------------------------------------------------


@dataclass
class _Connection:
    address: DicomwebAddress
    client: object  # dicomweb_client.DICOMwebClient
    credentials: str  # where the credentials came from (never their value)


def _connect(address: DicomwebAddress) -> _Connection:
    requests = require("requests", "requests")
    dicomweb_client = require("dicomweb_client", "dicomweb-client")
    session = requests.Session()
    session.verify = True
    host = urllib.parse.urlsplit(address.base_url).hostname or ""
    token, user = os.environ.get(ENV_TOKEN), os.environ.get(ENV_USER)
    if token:
        session.auth = _bearer(token)  # an auth object: requests then skips netrc
        credentials = f"bearer token from {ENV_TOKEN}"
    elif user:
        password = os.environ.get(ENV_PASSWORD)
        if password is None:
            raise PacsError(f"{ENV_USER} is set but {ENV_PASSWORD} is not")
        session.auth = (user, password)
        credentials = f"user {user!r} from {ENV_USER}/{ENV_PASSWORD}"
    else:
        credentials = _netrc_credentials(session, host)
    client = dicomweb_client.DICOMwebClient(url=address.base_url, session=session)
    # dicomweb-client retries every failure, TLS and refused connections included: a few
    # short retries ride out a busy server without a minute of backoff before an error.
    client.set_http_retry_params(max_attempts=HTTP_ATTEMPTS, wait_exponential_multiplier=250)
    return _Connection(address, client, credentials)


def _bearer(token: str):
    """A requests auth object sending `Authorization: Bearer <token>` (its repr hides it)."""
    requests = require("requests", "requests")

    class BearerAuth(requests.auth.AuthBase):
        def __call__(self, request):
            request.headers["Authorization"] = f"Bearer {token}"
            return request

        def __repr__(self) -> str:
            return "BearerAuth(<hidden>)"

    return BearerAuth()


def _netrc_credentials(session, host: str) -> str:
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    if not path.is_file():
        session.trust_env = True
        return f"no credentials (none in {ENV_TOKEN}, {ENV_USER}, or a netrc file)"
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError) as err:
        line = getattr(err, "lineno", None)
        raise PacsError(f"{path}: cannot read the netrc file"
                        + (f" (line {line})" if line else "")) from None
    if entry is None:
        return f"no credentials (no machine {host!r} in {path})"
    login, _account, password = entry
    session.auth = (login, password or "")
    return f"user {login!r} from netrc file {path}"


@contextlib.contextmanager
def _talking_to(connection: _Connection, doing: str) -> Iterator[None]:
    """Map HTTP, TLS and network failures to PacsError naming the server (no credentials)."""
    requests = require("requests", "requests")
    where = connection.address.url
    try:
        yield
    except requests.exceptions.HTTPError as err:
        status = err.response.status_code if err.response is not None else None
        reason = err.response.reason if err.response is not None else ""
        if status in (401, 403):
            raise PacsError(f"{where}: the DICOMweb server refused access (HTTP {status} "
                            f"{reason}) while {doing}; credentials used: "
                            f"{connection.credentials}") from None
        if status == 404:
            raise PacsError(f"{where}: not found on the DICOMweb server (HTTP 404) while "
                            f"{doing}") from None
        raise PacsError(f"{where}: the DICOMweb server answered HTTP {status} {reason} while "
                        f"{doing}") from None
    except requests.exceptions.SSLError:
        raise PacsError(f"{where}: TLS certificate verification failed while {doing}; MedSR "
                        "verifies certificates: point REQUESTS_CA_BUNDLE at your CA "
                        "bundle") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as err:
        raise PacsError(f"{where}: cannot reach the DICOMweb server while {doing} "
                        f"({type(err).__name__})") from None


# --- reading ---------------------------------------------------------------------------------


def _value(item: dict, tag: str, default=None):
    values = item.get(tag, {}).get("Value")
    return values[0] if values else default


def _series_bytes(metadata: Sequence[dict]) -> int:
    """Uncompressed pixel bytes of a series from its WADO-RS metadata."""
    total = 0
    for item in metadata:
        rows, columns = int(_value(item, "00280010", 0)), int(_value(item, "00280011", 0))
        bits = int(_value(item, "00280100", 16))
        frames = int(_value(item, "00280008", 1) or 1)
        samples = int(_value(item, "00280002", 1) or 1)
        total += rows * columns * math.ceil(bits / 8) * frames * samples
    return total


def download_series(url: str | DicomwebAddress, folder: str | os.PathLike) -> list[Path]:
    """Retrieve the series `url` names with WADO-RS into the empty folder `folder`, one Part 10
    file per instance; returns the files.

    Checked before the download: the series exists, its pixel data fits in memory and on the
    disk. Checked after: every instance arrived once and belongs to the series and study.
    PacsError otherwise (the caller removes `folder`).
    """
    from ..runtime import memory_budget

    address = url if isinstance(url, DicomwebAddress) else parse_address(url)
    if not (address.study_uid and address.series_uid):
        raise PacsError(f"{address.url}: names no series; expected "
                        "BASE/studies/STUDY_UID/series/SERIES_UID")
    folder = Path(folder)
    connection = _connect(address)
    with _talking_to(connection, "reading the series metadata (WADO-RS)"):
        metadata = connection.client.retrieve_series_metadata(address.study_uid,
                                                              address.series_uid)
    if not metadata:
        raise PacsError(f"{address.url}: the series holds no instances")
    needed = _series_bytes(metadata)
    memory_budget.check_fits(needed, f"{address.url}: its {len(metadata)} instances")
    free = shutil.disk_usage(folder).free
    if needed + DISK_RESERVE_BYTES > free:
        raise PacsError(f"{address.url}: its {len(metadata)} instances need about "
                        f"{needed / 2**20:.0f} MiB; {folder} has {free / 2**20:.0f} MiB free")
    files, seen = [], set()
    with _talking_to(connection, "retrieving the series (WADO-RS)"):
        for number, dataset in enumerate(connection.client.iter_series(
                address.study_uid, address.series_uid), start=1):
            series = str(dataset.get("SeriesInstanceUID", ""))
            study = str(dataset.get("StudyInstanceUID", ""))
            if series != address.series_uid or study != address.study_uid:
                raise PacsError(f"{address.url}: the server returned an instance of series "
                                f"{series or '(none)'} in study {study or '(none)'}")
            sop_uid = str(dataset.get("SOPInstanceUID", ""))
            if sop_uid in seen:
                continue
            seen.add(sop_uid)
            path = folder / f"IM{number:06d}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            files.append(path)
    if len(files) != len(metadata):
        raise PacsError(f"{address.url}: received {len(files)} of the {len(metadata)} instances "
                        "the server lists (did the series change during the download?)")
    return files


@contextlib.contextmanager
def fetched_series(url: str) -> Iterator[Path]:
    """A temporary folder holding the series `url` names (removed on leaving the block)."""
    with tempfile.TemporaryDirectory(prefix="medsr-wado-") as temp:
        folder = Path(temp) / "series"
        folder.mkdir()
        download_series(url, folder)
        yield folder


def check_series_request(url: str, series_uid: str | None = None) -> None:
    """PacsError unless `url` names one series and `series_uid` (if given) is that series;
    `io.read_volume` then reads the `fetched_series` folder like a local DICOM folder."""
    address = parse_address(url)
    if series_uid is not None and series_uid != address.series_uid:
        raise PacsError(f"{address.url}: the URL names the series; do not pass another series "
                        f"UID ({series_uid})")


def series_urls(url: str) -> list[str]:
    """The image series a study URL names (QIDO-RS), or `[url]` for a series URL; non-image
    series (SR, PR, SEG, RTSTRUCT, ...) are left out."""
    address = parse_address(url)
    if address.series_uid:
        return [address.url]
    if not address.study_uid:
        raise PacsError(f"{address.url}: names no study; expected "
                        "BASE/studies/STUDY_UID[/series/SERIES_UID]")
    connection = _connect(address)
    with _talking_to(connection, "searching the study's series (QIDO-RS)"):
        found = connection.client.search_for_series(address.study_uid, get_remaining=True)
    urls = []
    for item in found:
        modality = str(_value(item, "00080060", "") or "").upper()
        uid = _value(item, "0020000E")
        if uid and modality not in NON_IMAGE_MODALITIES:
            urls.append(DicomwebAddress(address.base_url, address.study_uid, str(uid)).url)
    if not urls:
        raise PacsError(f"{address.url}: the study holds no image series")
    return sorted(urls)


# --- writing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreReport:
    """What a send stored: the series, where, and how many instances."""

    series_uid: str
    study_uid: str
    stored: int
    destination: str

    def line(self) -> str:
        return (f"sent {self.stored} instances of series {self.series_uid} (study "
                f"{self.study_uid}) to {self.destination}")


def series_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files of the series folder `folder` (one series; PacsError otherwise)."""
    from pydicom.misc import is_dicom  # the "DICM" preamble, as the folder reader asks

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_dicom(p))
    if not files:
        raise PacsError(f"{folder}: holds no DICOM files to send")
    return files


def store_series(folder: str | os.PathLike, base_url: str) -> StoreReport:
    """Store the series in `folder` with STOW-RS at the DICOMweb service `base_url`.

    PacsError when any instance is refused or the connection fails; the message says how many
    were stored. Sending the same files again stores no duplicate (same SOP Instance UIDs).
    """
    import pydicom

    address = parse_address(base_url)
    files = series_files(folder)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    series_uid, study_uid = str(first.SeriesInstanceUID), str(first.StudyInstanceUID)
    destination = DicomwebAddress(address.base_url).url
    connection = _connect(DicomwebAddress(address.base_url))
    stored = 0
    for start in range(0, len(files), STOW_INSTANCES_PER_REQUEST):
        chunk = [pydicom.dcmread(p) for p in files[start:start + STOW_INSTANCES_PER_REQUEST]]
        try:
            with _talking_to(connection, "storing the series (STOW-RS)"):
                response = connection.client.store_instances(chunk, study_instance_uid=study_uid)
        except PacsError as err:
            raise PacsError(partial_store_message(err, stored, len(files), series_uid)) from None
        failed = list(response.get("FailedSOPSequence", []) or [])
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            stored += len(chunk) - len(failed)
            failure = (f"{destination}: the server refused {len(failed)} instance(s) (failure "
                       f"reason {', '.join(reasons)})")
            raise PacsError(partial_store_message(failure, stored, len(files), series_uid))
        stored += len(chunk)
    return StoreReport(series_uid, study_uid, stored, destination)


def partial_store_message(error: object, stored: int, total: int, series_uid: str) -> str:
    """`error` followed by what of the series was stored and what to do about it."""
    if stored == 0:
        return f"{error}; nothing of series {series_uid} was stored"
    return (f"{error}; {stored} of {total} instances of series {series_uid} were stored: run "
            "the same command again to complete it (the series keeps its UIDs, so nothing is "
            "stored twice)")
