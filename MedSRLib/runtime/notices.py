"""One-line notices on stderr, each printed once per process (shared by the engine and its
backends, which must not import the engine back)."""

from __future__ import annotations

import sys

_NOTICES: set[str] = set()


def notice(message: str) -> None:
    """Print a one-line notice on stderr, once per process and message."""
    if message not in _NOTICES:
        _NOTICES.add(message)
        print(f"medsr: note: {message}", file=sys.stderr, flush=True)
