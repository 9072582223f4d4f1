"""One entry point for a `--send` target: a DICOMweb base URL (STOW-RS) or `AET@HOST:PORT`
(C-STORE)."""

from __future__ import annotations

import os

from . import dicomweb, dimse, is_url
from .dicomweb import StoreReport

__all__ = ["check_target", "send_series"]


def check_target(target: str) -> "dicomweb.DicomwebAddress | dimse.DimseNode":
    """The parsed target, checked before any work; PacsError naming the problem."""
    if is_url(target):
        return dicomweb.parse_address(target)
    return dimse.parse_node(target)


def send_series(folder: str | os.PathLike, target: str,
                calling_ae: str = dimse.DEFAULT_CALLING_AE) -> StoreReport:
    """Store the series in `folder` at `target` (STOW-RS or C-STORE); PacsError on failure,
    saying how much was stored."""
    parsed = check_target(target)
    if isinstance(parsed, dicomweb.DicomwebAddress):
        return dicomweb.store_series(folder, parsed.base_url)
    return dimse.store_series(folder, parsed, calling_ae)
