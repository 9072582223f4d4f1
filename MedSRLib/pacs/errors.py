"""Errors of the PACS transport (user-fixable: the CLI exits 2)."""

from __future__ import annotations

from ..errors import InputError


class PacsError(InputError):
    """A PACS refused, could not be reached, or stored only part of a series.

    The message names the server (never credentials) and what was and was not stored.
    """


def require(module: str, package: str):
    """Import `module`, or PacsError saying how to install it (the `pacs` extra)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise PacsError(f"{package} is not installed; install it with "
                        f"`pip install 'MedSRLib[pacs]'` (or `pip install {package}`)") from None
