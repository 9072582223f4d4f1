"""A DICOM node (C-STORE SCP) that super-resolves the series it is sent and forwards them.

Associations are accepted only from the calling AE titles it trusts and only for the image
storage classes MedSR writes (CT and MR Image Storage). Each received instance is saved under
a private temporary folder, one folder per series; a series is complete when none of its
instances arrived for `idle_seconds`. A complete series is read with the checks of a local
DICOM folder, super-resolved with `api.upscale`, written as a derived series
(`dicom_export`) and only then sent on whole. A series that cannot be read, super-resolved or
sent is logged with the reason and not forwarded (a send that failed part-way is logged with
how many instances were stored). Ctrl-C (or SIGTERM) stops the server, reports the series
still incomplete and removes the temporary folder.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .dimse import check_ae_title
from .errors import PacsError, require

__all__ = ["listen", "Listener", "ACCEPTED_STORAGE"]

log = logging.getLogger("medsr.listen")

#: Storage classes accepted: the classes a derived series can be written for.
ACCEPTED_STORAGE = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4")
_SAFE_UID = re.compile(r"^[0-9.]{1,64}$")


@dataclass
class _Incoming:
    """A series being received: its folder, who sends it, when the last instance came."""

    folder: Path
    calling_ae: str
    last_arrival: float
    instances: int = 0
    rejected: list[str] = field(default_factory=list)


class Listener:
    """The SCP and its queue of incoming series; `run()` serves until interrupted."""

    def __init__(self, *, port: int, ae_title: str, allowed_ae_titles: list[str], target: str,
                 upscale_options: dict, idle_seconds: float = 10.0, host: str = "0.0.0.0",
                 work_folder: str | os.PathLike | None = None):
        from . import send

        if not allowed_ae_titles:
            raise PacsError("--allow-ae: name at least one calling AE title to accept series from")
        self.ae_title = check_ae_title(ae_title, "--ae-title")
        self.allowed = [check_ae_title(t, "--allow-ae") for t in allowed_ae_titles]
        self.target = target
        send.check_target(target)
        self.upscale_options = dict(upscale_options)
        self.idle_seconds = float(idle_seconds)
        self.host, self.port = host, int(port)
        self.work = Path(tempfile.mkdtemp(prefix="medsr-listen-", dir=work_folder))
        self.lock = threading.Lock()
        self.incoming: dict[str, _Incoming] = {}
        self.forwarded = self.failed = 0
        self._batches = 0
        self._server = None

    # --- receiving (pynetdicom's threads) -----------------------------------------------------

    def _on_store(self, event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        calling = event.assoc.requestor.ae_title.strip()
        series_uid = str(dataset.get("SeriesInstanceUID", "") or "")
        sop_uid = str(dataset.get("SOPInstanceUID", "") or "")
        if not (_SAFE_UID.match(series_uid) and _SAFE_UID.match(sop_uid)):
            log.warning("refused an instance from %s without valid Series/SOP Instance UIDs",
                        calling)
            return 0xA900  # data set does not match SOP class
        with self.lock:
            entry = self.incoming.get(series_uid)
            if entry is None:
                self._batches += 1
                folder = self.work / f"{self._batches:04d}-{series_uid}"
                folder.mkdir()
                entry = self.incoming[series_uid] = _Incoming(folder, calling, time.monotonic())
                log.info("receiving series %s from %s", series_uid, calling)
            path = entry.folder / f"{sop_uid}.dcm"
            temp = path.with_suffix(".part")
            try:
                dataset.save_as(temp, enforce_file_format=True)
                os.replace(temp, path)
            except OSError as err:
                log.error("series %s: cannot save an instance (%s)", series_uid, err)
                return 0xA700  # out of resources
            entry.instances += 1
            entry.last_arrival = time.monotonic()
        return 0x0000

    # --- processing (the main thread) ---------------------------------------------------------

    def _complete_series(self) -> list[tuple[str, _Incoming]]:
        now = time.monotonic()
        with self.lock:
            done = [(uid, e) for uid, e in self.incoming.items()
                    if now - e.last_arrival >= self.idle_seconds]
            for uid, _ in done:
                del self.incoming[uid]  # a later instance of it starts a new batch
        return done

    def _process(self, series_uid: str, entry: _Incoming) -> None:
        from .. import api
        from ..io import volumes as io
        from ..io.dicom_export import write_dicom_series
        from . import send

        out = entry.folder.with_name(entry.folder.name + "-derived")
        what = f"series {series_uid} from {entry.calling_ae} ({entry.instances} instances)"
        try:
            image = io.read_volume(entry.folder)
            result = api.upscale(image, **self.upscale_options)
            write_dicom_series(result, entry.folder, out,
                               weights=self.upscale_options.get("weights"),
                               modality=self.upscale_options.get("modality"))
            report = send.send_series(out, self.target, calling_ae=self.ae_title)
        except InputError as err:
            self.failed += 1
            log.error("%s: not forwarded: %s", what, err)
        except Exception as err:  # noqa: BLE001 - one bad series must not stop the node
            self.failed += 1
            log.error("%s: not forwarded: internal error %s: %s", what, type(err).__name__, err)
        else:
            self.forwarded += 1
            log.info("%s: %s", what, report.line())
        finally:
            shutil.rmtree(entry.folder, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)

    def start(self) -> None:
        """Start the SCP in the background; PacsError when the port cannot be bound."""
        pynetdicom = require("pynetdicom", "pynetdicom")
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        ae = pynetdicom.AE(ae_title=self.ae_title)
        syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                    *[s for s in pynetdicom.ALL_TRANSFER_SYNTAXES
                      if s not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)]]
        for storage in ACCEPTED_STORAGE:
            ae.add_supported_context(storage, syntaxes)
        ae.add_supported_context(pynetdicom.sop_class.Verification)
        ae.require_calling_aet = self.allowed
        ae.require_called_aet = True
        handlers = [(pynetdicom.evt.EVT_C_STORE, self._on_store),
                    (pynetdicom.evt.EVT_REJECTED, self._on_rejected)]
        try:
            self._server = ae.start_server((self.host, self.port), block=False,
                                           evt_handlers=handlers)
        except OSError as err:
            raise PacsError(f"--port {self.port}: cannot listen on {self.host}:{self.port} "
                            f"({err.strerror or err})") from None

    def _on_rejected(self, event) -> None:
        log.warning("refused an association from %s (not an allowed AE title, or not "
                    "addressed to %s)", event.assoc.requestor.ae_title.strip(), self.ae_title)

    def step(self) -> int:
        """Process the series complete now; returns how many."""
        done = self._complete_series()
        for series_uid, entry in done:
            self._process(series_uid, entry)
        return len(done)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        with self.lock:
            left = dict(self.incoming)
            self.incoming.clear()
        for uid, entry in left.items():
            log.warning("series %s from %s: incomplete when stopped (%d instances); not "
                        "forwarded", uid, entry.calling_ae, entry.instances)
        shutil.rmtree(self.work, ignore_errors=True)


def listen(*, port: int, ae_title: str, allowed_ae_titles: list[str], target: str,
           upscale_options: dict, idle_seconds: float = 10.0, host: str = "0.0.0.0") -> int:
    """Serve as a C-STORE SCP until Ctrl-C/SIGTERM; returns exit status 0 after a clean stop.

    Logs to stderr: each series received, forwarded (with the target's series) or not
    forwarded (with the reason), and refused associations.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("medsr listen: %(asctime)s %(levelname)s %(message)s",
                                           "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    from .. import api  # noqa: F401 - the heavy imports happen before the node accepts series

    node = Listener(port=port, ae_title=ae_title, allowed_ae_titles=allowed_ae_titles,
                    target=target, upscale_options=upscale_options, idle_seconds=idle_seconds,
                    host=host)
    try:
        node.start()
        log.info("listening on %s:%d as %s; accepting from %s; sending to %s", host, port,
                 node.ae_title, ", ".join(node.allowed), target)
        while True:
            if not node.step():
                time.sleep(0.2)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        node.stop()
        log.info("stopped: %d series forwarded, %d not forwarded", node.forwarded, node.failed)
        log.removeHandler(handler)
    return 0
