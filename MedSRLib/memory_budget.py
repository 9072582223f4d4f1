"""How much memory this process may still allocate, and a refusal before a too-large allocation."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError


def available_bytes() -> int | None:
    """Bytes this process can still allocate without swapping: the smaller of the kernel's
    MemAvailable and the cgroup's memory.max minus its usage; None when neither is known."""
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            candidates.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    if not candidates and hasattr(os, "sysconf"):
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    return min(candidates) if candidates else None


def format_bytes(count: float) -> str:
    """`count` bytes as a short human figure ("6.4 GB", "512.0 MB")."""
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} bytes"


def check_fits(needed_bytes: int, what: str) -> None:
    """InputError naming `what` and both sizes when `needed_bytes` exceeds what is available."""
    available = available_bytes()
    if available is not None and needed_bytes > available:
        raise InputError(f"{what} needs {format_bytes(needed_bytes)} of memory; this machine has "
                         f"{format_bytes(available)} available")
