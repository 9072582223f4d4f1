"""From and back to the PACS, against a real Orthanc (with its DICOMweb plugin) on loopback.

The session fixture starts Orthanc with its own temporary configuration and storage, HTTP basic
authentication on, on free ports; the real CT and MR series of ../shared/data (6 contiguous
slices of each, files unchanged) are uploaded to it. Each round trip then checks in Orthanc's
own REST API that the derived series is in the source's study, with the source's PatientID,
the expected number of instances and the expected geometry.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from MedSRLib import cli
from MedSRLib.io import volumes as io
from MedSRLib.errors import InputError
from MedSRLib.pacs import dicomweb, send

requests = pytest.importorskip("requests", reason="requests is needed for the PACS tests")
pytest.importorskip("dicomweb_client", reason="dicomweb-client (extra 'pacs') is not installed")
pynetdicom = pytest.importorskip("pynetdicom", reason="pynetdicom (extra 'pacs') is not installed")

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = next((p for p in (Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
                                    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"))
                        if p.exists()), None)
USER, PASSWORD = "medsr-test", "s3cret-Orthanc-pw"
ORTHANC_AET, SENDER_AET = "ORTHANC", "MODALITY"
SERIES = {"CT": "ct/crlm-ct-1004-dicom", "MR": "mr/pelvis-t2-dicom"}
SLICES = 6
GEOMETRY_TOLERANCE_MM = 1e-4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Orthanc:
    """A running Orthanc: REST (authenticated session), DICOMweb base URL, DICOM node."""

    def __init__(self, http_port: int, dicom_port: int):
        self.http = f"http://127.0.0.1:{http_port}"
        self.dicomweb = f"{self.http}/dicom-web"
        self.node = f"{ORTHANC_AET}@127.0.0.1:{dicom_port}"
        self.dicom_port = dicom_port
        self.rest = requests.Session()
        self.rest.auth = (USER, PASSWORD)

    def get(self, path: str):
        response = self.rest.get(self.http + path, timeout=30)
        response.raise_for_status()
        return response.json()

    def series(self, series_uid: str) -> dict | None:
        """Orthanc's record of the series: its instances, study and patient (None if absent)."""
        found = self.rest.post(self.http + "/tools/lookup", data=series_uid, timeout=30).json()
        ids = [f["ID"] for f in found if f["Type"] == "Series"]
        if not ids:
            return None
        record = self.get(f"/series/{ids[0]}")
        record["study"] = self.get(f"/series/{ids[0]}/study")
        record["patient"] = self.get(f"/series/{ids[0]}/patient")
        return record

    def series_of_study(self, study_uid: str) -> list[str]:
        query = json.dumps({"Level": "Series", "Query": {"StudyInstanceUID": study_uid},
                            "Expand": True})
        for attempt in range(3):  # Orthanc may drop a kept-alive connection as a POST reuses it
            try:
                found = self.rest.post(self.http + "/tools/find", timeout=30, data=query).json()
                break
            except requests.ConnectionError:
                if attempt == 2:
                    raise
                time.sleep(0.5)
        return sorted(s["MainDicomTags"]["SeriesInstanceUID"] for s in found)

    def upload(self, files) -> None:
        for path in files:
            response = self.rest.post(self.http + "/instances", data=Path(path).read_bytes(),
                                      timeout=60)
            response.raise_for_status()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb; "
                    "Testing/install_test_tools.sh does it)")
    if DICOMWEB_PLUGIN is None:
        pytest.skip("the Orthanc DICOMweb plugin is not installed "
                    "(apt-get install orthanc-dicomweb)")
    root = tmp_path_factory.mktemp("orthanc")
    http_port, dicom_port = _free_port(), _free_port()
    listener_port = _free_port()
    config = {
        "Name": "MedSR test PACS", "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"), "HttpPort": http_port,
        "DicomPort": dicom_port, "DicomAet": ORTHANC_AET, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomModalities": {"medsr": ["MEDSR", "127.0.0.1", listener_port],
                            "modality": [SENDER_AET, "127.0.0.1", _free_port()]},
        "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": True, "SaveJobs": False,
        "StorageCompression": False, "HttpVerbose": False,
    }
    (root / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
    log = open(root / "orthanc.log", "w")
    process = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log,
                               stderr=subprocess.STDOUT, cwd=root)
    server = Orthanc(http_port, dicom_port)
    server.listener_port = listener_port
    deadline = time.monotonic() + 60
    while True:
        try:
            if server.rest.get(server.http + "/system", timeout=2).ok:
                break
        except requests.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("Orthanc did not start: " + (root / "orthanc.log").read_text(encoding="utf-8")[-2000:])
        time.sleep(0.3)
    yield server
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def _slices_in_order(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if io.is_dicom_file(p)]
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in files}
    first = headers[files[0]]
    normal = np.cross(np.asarray(first.ImageOrientationPatient[:3], float),
                      np.asarray(first.ImageOrientationPatient[3:], float))
    return sorted(files, key=lambda p: float(np.dot(headers[p].ImagePositionPatient, normal)))


@pytest.fixture(scope="session")
def uploaded(orthanc, shared_data, tmp_path_factory):
    """Modality -> the uploaded real series: local folder (the same files), UIDs, PatientID."""
    result = {}
    for modality, relative in SERIES.items():
        source = shared_data / relative
        if not source.is_dir():
            pytest.skip(f"{source}: real {modality} DICOM series is not present")
        folder = tmp_path_factory.mktemp(f"source-{modality}")
        for path in _slices_in_order(source)[:SLICES]:
            shutil.copy2(path, folder / path.name)
        orthanc.upload(sorted(folder.iterdir()))
        first = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
        result[modality] = {
            "folder": folder, "study": str(first.StudyInstanceUID),
            "series": str(first.SeriesInstanceUID), "patient": str(first.PatientID),
            "url": f"{orthanc.dicomweb}/studies/{first.StudyInstanceUID}/series/"
                   f"{first.SeriesInstanceUID}"}
    return result


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv(dicomweb.ENV_USER, USER)
    monkeypatch.setenv(dicomweb.ENV_PASSWORD, PASSWORD)
    monkeypatch.delenv(dicomweb.ENV_TOKEN, raising=False)


@pytest.fixture
def derived(orthanc):
    """Series UIDs a test stored in Orthanc; deleted afterwards, so that the next test (which
    derives the same deterministic UIDs from the same source) finds nothing of them."""
    made: list[str] = []
    yield made
    for uid in made:
        for found in orthanc.rest.post(orthanc.http + "/tools/lookup", data=uid, timeout=30).json():
            orthanc.rest.delete(orthanc.http + found["Path"], timeout=30)


def _expected_geometry(source_folder: Path, factor: int) -> sitk.Image:
    """The x`factor` in-plane grid of the source: same extent, spacing / factor."""
    source = io.read_volume(source_folder)
    size = [source.GetSize()[0] * factor, source.GetSize()[1] * factor, source.GetSize()[2]]
    spacing = [source.GetSpacing()[0] / factor, source.GetSpacing()[1] / factor,
               source.GetSpacing()[2]]
    direction = np.asarray(source.GetDirection()).reshape(3, 3)
    shift = direction @ np.array([(spacing[0] - source.GetSpacing()[0]) / 2,
                                  (spacing[1] - source.GetSpacing()[1]) / 2, 0.0])
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(spacing)
    grid.SetDirection(source.GetDirection())
    grid.SetOrigin(tuple(np.asarray(source.GetOrigin()) + shift))
    return grid


def _assert_derived_series_in_orthanc(orthanc: Orthanc, entry: dict, series_uid: str,
                                      factor: int = 2) -> None:
    record = orthanc.series(series_uid)
    assert record is not None, f"derived series {series_uid} is not in Orthanc"
    assert record["study"]["MainDicomTags"]["StudyInstanceUID"] == entry["study"]
    assert record["patient"]["MainDicomTags"]["PatientID"] == entry["patient"]
    assert len(record["Instances"]) == SLICES
    assert series_uid in orthanc.series_of_study(entry["study"])
    # geometry as stored in Orthanc, read back over WADO-RS with the same checks as a folder
    stored = io.read_volume(f"{orthanc.dicomweb}/studies/{entry['study']}/series/{series_uid}")
    expected = _expected_geometry(entry["folder"], factor)
    assert stored.GetSize() == expected.GetSize()
    np.testing.assert_allclose(stored.GetSpacing(), expected.GetSpacing(),
                               atol=GEOMETRY_TOLERANCE_MM)
    np.testing.assert_allclose(stored.GetOrigin(), expected.GetOrigin(), atol=GEOMETRY_TOLERANCE_MM)
    np.testing.assert_allclose(stored.GetDirection(), expected.GetDirection(), atol=1e-6)


def _series_uid_of(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)


def test_read_volume_of_a_series_url_equals_the_series_read_from_files(orthanc, uploaded,
                                                                       credentials):
    entry = uploaded["CT"]
    from_pacs = io.read_volume(entry["url"])
    from_files = io.read_volume(entry["folder"])
    assert from_pacs.GetSize() == from_files.GetSize() == (512, 512, SLICES)
    assert np.array_equal(sitk.GetArrayFromImage(from_pacs), sitk.GetArrayFromImage(from_files))
    np.testing.assert_allclose(from_pacs.GetOrigin(), from_files.GetOrigin(), atol=1e-9)
    assert io.modality_of(from_pacs) == "CT"


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_series_url_in_stow_out_lands_in_the_source_study(orthanc, uploaded, credentials,
                                                          tmp_path, modality, derived, capsys):
    entry = uploaded[modality]
    out = tmp_path / "derived"
    code = cli.main(["upscale", entry["url"], str(out), "--model", "bicubic", "--scale", "2",
                     "--quiet", "--send", orthanc.dicomweb])
    derived.append(_series_uid_of(out))
    assert code == 0, capsys.readouterr().err
    assert orthanc.series(derived[0]) is not None
    assert len(list(out.iterdir())) == SLICES  # the same files as --format dicom
    _assert_derived_series_in_orthanc(orthanc, entry, _series_uid_of(out))


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_series_url_in_c_store_out_lands_in_the_source_study(orthanc, uploaded, credentials,
                                                             tmp_path, modality, derived, capsys):
    entry = uploaded[modality]
    out = tmp_path / "derived"
    assert cli.main(["upscale", entry["url"], str(out), "--model", "bicubic", "--scale", "2",
                     "--quiet"]) == 0
    derived.append(_series_uid_of(out))
    assert orthanc.series(derived[0]) is None  # not there before the send
    shutil.rmtree(out)
    code = cli.main(["upscale", entry["url"], str(out), "--model", "bicubic", "--scale", "2",
                     "--quiet", "--send", orthanc.node, "--format", "dicom"])
    assert code == 0, capsys.readouterr().err
    assert _series_uid_of(out) == derived[0]  # same source, model and scale: same UIDs
    _assert_derived_series_in_orthanc(orthanc, entry, _series_uid_of(out))


def test_retry_after_an_interrupted_send_stores_no_second_copy(orthanc, uploaded, credentials,
                                                               tmp_path, derived, capsys):
    entry = uploaded["CT"]
    out = tmp_path / "derived"
    assert cli.main(["upscale", entry["url"], str(out), "--model", "bicubic", "--quiet"]) == 0
    derived.append(_series_uid_of(out))
    partial = tmp_path / "first-half"  # a send cut off after 3 instances
    partial.mkdir()
    for path in sorted(out.iterdir())[:3]:
        shutil.copy2(path, partial / path.name)
    assert send.send_series(partial, orthanc.node).stored == 3
    assert len(orthanc.series(derived[0])["Instances"]) == 3
    before = orthanc.series_of_study(entry["study"])
    for target in (orthanc.node, orthanc.dicomweb):  # the retry, by either route, twice
        assert cli.main(["upscale", entry["url"], "--model", "bicubic", "--quiet",
                         "--send", target]) == 0, capsys.readouterr().err
    assert orthanc.series_of_study(entry["study"]) == before  # no new series
    _assert_derived_series_in_orthanc(orthanc, entry, derived[0])  # whole, once


def test_failed_send_exits_2_and_says_nothing_was_stored(uploaded, tmp_path, capsys):
    closed = _free_port()
    out = tmp_path / "derived"
    code = cli.main(["upscale", str(uploaded["CT"]["folder"]), str(out), "--model", "bicubic",
                     "--quiet", "--send", f"NOBODY@127.0.0.1:{closed}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"NOBODY@127.0.0.1:{closed}" in err and "nothing of series" in err
    assert len(list(out.iterdir())) == SLICES  # the local series is kept, whole


def test_wrong_password_exits_2_without_printing_it(orthanc, uploaded, tmp_path, monkeypatch,
                                                    capsys):
    wrong = "not-the-Passw0rd-xyz"
    monkeypatch.setenv(dicomweb.ENV_USER, USER)
    monkeypatch.setenv(dicomweb.ENV_PASSWORD, wrong)
    code = cli.main(["upscale", uploaded["CT"]["url"], str(tmp_path / "out.nrrd"), "--quiet"])
    captured = capsys.readouterr()
    assert code == 2
    assert "refused access (HTTP 401" in captured.err and dicomweb.ENV_USER in captured.err
    assert wrong not in captured.err + captured.out
    assert not (tmp_path / "out.nrrd").exists()


def test_credentials_in_the_url_are_refused_and_not_echoed(orthanc, uploaded, tmp_path, capsys):
    url = uploaded["CT"]["url"].replace("http://", f"http://{USER}:{PASSWORD}@")
    assert cli.main(["upscale", url, str(tmp_path / "out.nrrd"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "must not hold a user name or password" in err and PASSWORD not in err


def test_netrc_credentials_read_the_series(orthanc, uploaded, tmp_path, monkeypatch):
    for name in (dicomweb.ENV_USER, dicomweb.ENV_PASSWORD, dicomweb.ENV_TOKEN):
        monkeypatch.delenv(name, raising=False)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n", encoding="utf-8")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    image = io.read_volume(uploaded["MR"]["url"])
    assert image.GetSize()[2] == SLICES and io.modality_of(image) == "MR"


def test_batch_expands_a_study_url_to_its_image_series(orthanc, uploaded, credentials, tmp_path):
    entry = uploaded["MR"]
    study_url = f"{orthanc.dicomweb}/studies/{entry['study']}"
    assert dicomweb.series_urls(study_url) == [entry["url"]]
    out = tmp_path / "cohort"
    assert cli.main(["batch", study_url, "--out", str(out), "--no-ray", "--model", "bicubic",
                     "--quiet"]) == 0
    outputs = sorted(out.glob("*.nrrd"))
    assert [p.name for p in outputs] == [f"{entry['series']}.nrrd"]
    source = io.read_volume(entry["folder"])
    result = io.read_volume(outputs[0])
    assert result.GetSize() == (2 * source.GetSize()[0], 2 * source.GetSize()[1], SLICES)


def _listener_command(orthanc, port: int) -> list[str]:
    return [sys.executable, "-m", "MedSRLib.cli", "listen", "--host", "127.0.0.1", "--port",
            str(port), "--ae-title", "MEDSR", "--allow-ae", SENDER_AET, "--send", orthanc.node,
            "--idle-seconds", "4", "--model", "bicubic", "--scale", "2"]


def _associate(port: int, calling: str):
    ae = pynetdicom.AE(ae_title=calling)
    ae.add_requested_context(pydicom.uid.CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    ae.add_requested_context(pydicom.uid.MRImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title="MEDSR")


def test_listener_forwards_a_series_from_a_trusted_ae_and_refuses_others(orthanc, uploaded,
                                                                        tmp_path, derived,
                                                                        credentials):
    entry, broken = uploaded["MR"], uploaded["CT"]
    port = orthanc.listener_port
    log_path = tmp_path / "listen.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(_listener_command(orthanc, port), stderr=log_file,
                                   cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while True:  # wait until it answers (torch imports first)
            assoc = _associate(port, SENDER_AET)
            if assoc.is_established:
                break
            assert process.poll() is None, log_path.read_text(encoding="utf-8")
            assert time.monotonic() < deadline, "the listener did not start"
            time.sleep(0.5)
        for path in sorted(entry["folder"].iterdir()):
            assert assoc.send_c_store(path).Status == 0
        # a CT series with its 4th slice missing: uneven spacing, must not be forwarded
        for path in _slices_in_order(broken["folder"])[:3] + _slices_in_order(broken["folder"])[4:]:
            assert assoc.send_c_store(path).Status == 0
        assoc.release()

        stranger = _associate(port, "STRANGER")
        assert stranger.is_rejected and not stranger.is_established

        deadline = time.monotonic() + 120
        found = None
        while found is None and time.monotonic() < deadline:
            series = [uid for uid in orthanc.series_of_study(entry["study"])
                      if uid != entry["series"]]
            found = next((uid for uid in series
                          if len(orthanc.series(uid)["Instances"]) == SLICES), None)
            time.sleep(1)
        assert found is not None, "the listener forwarded nothing: " + log_path.read_text(encoding="utf-8")
        derived.append(found)
        _assert_derived_series_in_orthanc(orthanc, entry, found)
        description = orthanc.series(found)["MainDicomTags"]["SeriesDescription"]
        assert "MedSR x2,2,1 bicubic" in description
        while "not forwarded:" not in log_path.read_text(encoding="utf-8") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert orthanc.series_of_study(broken["study"]) == [broken["series"]], log_path.read_text(encoding="utf-8")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    log = log_path.read_text(encoding="utf-8")
    assert code == 0, log
    assert f"series {broken['series']} from {SENDER_AET} ({SLICES - 1} instances): not forwarded" in log
    assert "refused an association from STRANGER" in log
    assert "stopped: 1 series forwarded, 1 not forwarded" in log


def test_series_too_large_for_memory_is_refused_before_download(orthanc, uploaded, credentials,
                                                                monkeypatch):
    from MedSRLib.runtime import memory_budget

    monkeypatch.setattr(memory_budget, "available_bytes", lambda: 1_000_000)
    with pytest.raises(InputError, match=r"its 6 instances needs .* of memory"):
        io.read_volume(uploaded["CT"]["url"])


def test_bearer_token_goes_in_the_authorization_header_and_is_never_printed(monkeypatch,
                                                                            tmp_path):
    import http.server
    import threading

    seen = []

    class RefusingServer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), RefusingServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = "tok-Very-Secret-42"
    monkeypatch.setenv(dicomweb.ENV_TOKEN, token)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent-netrc"))
    url = f"http://127.0.0.1:{server.server_port}/dicom-web/studies/1.2/series/1.2.3"
    try:
        with pytest.raises(InputError) as raised:
            io.read_volume(url)
    finally:
        server.shutdown()
    assert seen == [f"Bearer {token}"]
    assert "HTTP 401" in str(raised.value) and dicomweb.ENV_TOKEN in str(raised.value)
    assert token not in str(raised.value)


def test_an_unverifiable_tls_certificate_is_refused(monkeypatch, tmp_path):
    import http.server
    import ssl
    import threading

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed (needed to make a self-signed certificate)")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    requested = []

    class Server(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Server)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(dicomweb.ENV_USER, USER)
    monkeypatch.setenv(dicomweb.ENV_PASSWORD, PASSWORD)
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    url = f"https://127.0.0.1:{server.server_port}/dicom-web/studies/1.2/series/1.2.3"
    try:
        with pytest.raises(InputError, match="TLS certificate verification failed"):
            io.read_volume(url)
    finally:
        server.shutdown()
    assert requested == []  # no request (and no credentials) went over the unverified channel


def test_derived_uids_depend_only_on_source_instances_model_and_scale(shared_data, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for path in _slices_in_order(shared_data / SERIES["CT"])[:SLICES]:
        shutil.copy2(path, source / path.name)

    def uids(name: str, *options: str) -> list[str]:
        out = tmp_path / name
        assert cli.main(["upscale", str(source), str(out), "--quiet", *options]) == 0
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(out.iterdir())]
        return [str(headers[0].SeriesInstanceUID)] + [str(h.SOPInstanceUID) for h in headers]

    first = uids("first", "--model", "bicubic", "--scale", "2")
    assert uids("again", "--model", "bicubic", "--scale", "2") == first
    assert len(set(first)) == SLICES + 1
    other_scale = uids("x3", "--model", "bicubic", "--scale", "3")
    other_model = uids("nearest", "--model", "nearest", "--scale", "2")
    sorted(source.iterdir())[0].unlink()  # the same series missing one instance
    fewer = uids("fewer", "--model", "bicubic", "--scale", "2")
    for other in (other_scale, other_model, fewer):
        assert not set(other) & set(first)
