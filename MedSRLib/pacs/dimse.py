"""DIMSE: a series folder stored with C-STORE (pynetdicom) to a node `AET@HOST:PORT`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .dicomweb import StoreReport, partial_store_message, series_files
from .errors import PacsError, require

__all__ = ["DimseNode", "parse_node", "store_series", "DEFAULT_CALLING_AE"]

#: The AE title MedSR calls other nodes with (the listener uses its own `--ae-title`).
DEFAULT_CALLING_AE = "MEDSR"
#: C-STORE statuses that mean stored: success and the warnings B000 (coercion of data
#: elements), B006 (elements discarded), B007 (data set does not match SOP class).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}
_NODE = re.compile(r"^(?P<aet>[^@]+)@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>\d{1,5})$")
_AE_TITLE = re.compile(r"^[\x20-\x5B\x5D-\x7E]{1,16}$")  # DICOM AE: 16 chars, no backslash


@dataclass(frozen=True)
class DimseNode:
    """A DICOM node: its AE title, host and port."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def check_ae_title(title: str, what: str = "AE title") -> str:
    """`title` stripped; PacsError unless it is 1-16 printable characters without '\\'."""
    stripped = title.strip()
    if not _AE_TITLE.match(stripped):
        raise PacsError(f"{what} {title!r}: an AE title is 1-16 printable characters, no backslash")
    return stripped


def parse_node(text: str) -> DimseNode:
    """`AET@HOST:PORT` (HOST may be a name, IPv4 or [IPv6]); PacsError naming the problem."""
    match = _NODE.match(text.strip())
    if not match:
        raise PacsError(f"{text!r}: a DICOM node is AET@HOST:PORT, e.g. PACS@10.0.0.5:104")
    port = int(match.group("port"))
    if not 0 < port < 65536:
        raise PacsError(f"{text!r}: port {port} is not 1-65535")
    return DimseNode(check_ae_title(match.group("aet")), match.group("host").strip("[]"), port)


def store_series(folder: str | os.PathLike, node: DimseNode | str,
                 calling_ae: str = DEFAULT_CALLING_AE) -> StoreReport:
    """C-STORE every file of the series in `folder` to `node` over one association.

    PacsError when the association is refused or lost, or an instance is not stored; the
    message says how many were. Sending the same files again stores no duplicate (same SOP
    Instance UIDs: a PACS keeps or replaces, never adds).
    """
    import pydicom

    pynetdicom = require("pynetdicom", "pynetdicom")
    node = parse_node(node) if isinstance(node, str) else node
    files = series_files(folder)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    series_uid, study_uid = str(headers[0].SeriesInstanceUID), str(headers[0].StudyInstanceUID)
    ae = pynetdicom.AE(ae_title=calling_ae)
    for sop_class, syntax in sorted({(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID))
                                      for h in headers}):
        ae.add_requested_context(sop_class, [syntax])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    try:
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    except (OSError, RuntimeError, ValueError) as err:
        raise PacsError(f"{node}: cannot connect ({err}); nothing of series {series_uid} was "
                        "stored") from None
    if not assoc.is_established:
        why = ("refused the association (is MedSR's AE title "
               f"{calling_ae!r} allowed there?)" if assoc.is_rejected else
               "did not answer (wrong host or port?)" if not assoc.is_aborted else
               "aborted the association")
        raise PacsError(f"{node}: {why}; nothing of series {series_uid} was stored")
    stored = 0
    try:
        for path in files:
            status = assoc.send_c_store(Path(path))
            code = int(status.Status) if status and "Status" in status else None
            if code not in _STORED:
                what = (f"status 0x{code:04X}" if code is not None else
                        "no answer (association lost or timed out)")
                failure = f"{node}: C-STORE of {Path(path).name} failed with {what}"
                raise PacsError(partial_store_message(failure, stored, len(files), series_uid))
            stored += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return StoreReport(series_uid, study_uid, stored, str(node))
