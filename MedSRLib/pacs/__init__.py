"""From and back to the PACS: DICOMweb and DIMSE transport for DICOM series.

- `dicomweb`: a series (or a study's image series) named by a DICOMweb URL
  (`https://HOST/dicom-web/studies/STUDY[/series/SERIES]`) retrieved with WADO-RS into a folder,
  and a series folder stored with STOW-RS; HTTP credentials from a netrc file or the
  `MEDSR_DICOMWEB_*` environment variables, never from the command line; TLS verified.
- `dimse`: a series folder stored with C-STORE to `AET@HOST:PORT`.
- `send`: one entry point for a `--send` target (DICOMweb URL or `AET@HOST:PORT`).
- `listener`: a C-STORE SCP that super-resolves the series trusted AE titles send it and
  forwards the derived series.
- `runs`: the `medsr upscale` glue (URL input, `--send`) and `medsr batch` URL expansion.

Moves files only: volumes are read and written by `MedSRLib.io.volumes` and `MedSRLib.io.dicom_export`
(the same checks as a local DICOM folder), super-resolution goes through `MedSRLib.api`.
Imports `io`, `dicom_export`, `api` and `errors` from MedSRLib, and `requests`,
`dicomweb-client` and `pynetdicom` (the `pacs` extra) when used; nothing imports this package
except the CLI and `io.read_volume` (for a URL).
"""

from __future__ import annotations

from .errors import PacsError

__all__ = ["PacsError", "is_url"]


def is_url(text: object) -> bool:
    """True when `text` is a string naming an http(s) URL (a DICOMweb study or series)."""
    return isinstance(text, str) and text.lower().startswith(("http://", "https://"))
