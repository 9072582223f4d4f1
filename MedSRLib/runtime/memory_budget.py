"""How much memory this process may still allocate, a refusal before a too-large allocation,
and the message for an allocation that failed anyway.

Limits read (the smallest wins): the kernel's MemAvailable; the memory cgroup of this process
and its ancestors, cgroup v2 (`memory.max` minus `memory.current`) and v1
(`memory.limit_in_bytes` minus `memory.usage_in_bytes`), as containers and batch schedulers set
them; and the address-space limit `RLIMIT_AS` (`ulimit -v`, `prlimit --as`) minus the address
space already mapped.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError

#: Where the cgroup file systems are mounted.
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: cgroup v1 reports "no limit" as a number near 2**63.
_NO_LIMIT = 1 << 60

#: (bytes needed, bytes available, what limits them) of the last `check_fits`: the figures an
#: out-of-memory message reports when an allocation fails later in the same run.
last_estimate: tuple[int, int | None, str] | None = None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _cgroup_dirs(controller_root: Path, relative: str) -> list[Path]:
    """`controller_root/relative` and each of its ancestors up to `controller_root` (a limit set
    on a parent applies to its children), those that exist."""
    parts = [p for p in relative.strip("/").split("/") if p]
    folders = [controller_root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [f for f in folders if f.is_dir()]


def cgroup_headroom(root: Path | None = None,
                    membership: str | None = None) -> tuple[int, str] | None:
    """(bytes the memory cgroup still allows, "cgroup v1/v2 limit N") for the tightest memory
    cgroup limit of this process (v1 and v2), or None when none is set.

    `membership`: the text of /proc/self/cgroup (read when None); `root`: `CGROUP_ROOT`."""
    root = CGROUP_ROOT if root is None else Path(root)
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text(encoding="utf-8")
        except OSError:
            membership = "0::/\n"
    found: list[tuple[int, str]] = []
    for line in membership.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, relative = fields
        if controllers == "":  # v2 unified hierarchy (root itself, or "unified" in hybrid mode)
            candidates = [(root, "memory.max", "memory.current"),
                          (root / "unified", "memory.max", "memory.current")]
            version = "v2"
        elif "memory" in controllers.split(","):
            candidates = [(root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes")]
            version = "v1"
        else:
            continue
        for controller_root, limit_name, usage_name in candidates:
            for folder in _cgroup_dirs(controller_root, relative):
                limit = _read_int(folder / limit_name)
                if limit is None or limit >= _NO_LIMIT:
                    continue
                used = _read_int(folder / usage_name) or 0
                found.append((max(0, limit - used), f"cgroup {version} memory limit {format_bytes(limit)}"))
    return min(found) if found else None


def address_space_headroom() -> tuple[int, str] | None:
    """(bytes of address space still allowed, "RLIMIT_AS N") under this process's RLIMIT_AS
    (`ulimit -v`), or None when unlimited."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    mapped = 0
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmSize:"):
                mapped = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    return max(0, soft - mapped), f"address-space limit (RLIMIT_AS) {format_bytes(soft)}"


def memory_headroom() -> tuple[int, str] | None:
    """(bytes this process can still allocate without swapping, what sets that figure): the
    smallest of MemAvailable, the cgroup limits and RLIMIT_AS; None when none is known."""
    candidates: list[tuple[int, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append((int(line.split()[1]) * 1024, "memory available on this machine"))
                break
    except (OSError, ValueError, IndexError):
        pass
    for limited in (cgroup_headroom(), address_space_headroom()):
        if limited is not None:
            candidates.append(limited)
    if not candidates and hasattr(os, "sysconf"):
        try:
            candidates.append((os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
                               "memory available on this machine"))
        except (OSError, ValueError):
            pass
    return min(candidates) if candidates else None


def available_bytes() -> int | None:
    """Bytes this process can still allocate (see `memory_headroom`); None when unknown."""
    headroom = memory_headroom()
    return None if headroom is None else headroom[0]


def format_bytes(count: float) -> str:
    """`count` bytes as a short human figure ("6.4 GB", "512.0 MB")."""
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} bytes"


def check_fits(needed_bytes: int, what: str) -> None:
    """InputError naming `what` and both sizes when `needed_bytes` exceeds what is available
    (and the limit that sets it); the figures are kept for `out_of_memory_message`."""
    global last_estimate
    available = available_bytes()
    headroom = memory_headroom()
    source = headroom[1] if headroom is not None and headroom[0] == available else ""
    last_estimate = (int(needed_bytes), available, source)
    if available is not None and needed_bytes > available:
        raise InputError(f"{what} needs {format_bytes(needed_bytes)} of memory; this machine has "
                         f"{format_bytes(available)} available" + (f" ({source})" if source else ""))


#: Texts of allocation failures: numpy/Python (MemoryError), torch ("can't allocate memory"),
#: ITK ("Failed to allocate memory", std::bad_alloc), the C library ("Cannot allocate memory").
_OUT_OF_MEMORY_TEXTS = ("out of memory", "can't allocate memory", "cannot allocate memory",
                        "failed to allocate", "bad_alloc", "unable to allocate",
                        "memory allocation failed")


def is_out_of_memory(err: BaseException) -> bool:
    """True when `err` reports a failed memory allocation (whatever library raised it)."""
    text = str(err).lower()
    return isinstance(err, MemoryError) or any(t in text for t in _OUT_OF_MEMORY_TEXTS)


def out_of_memory_message() -> str:
    """One line for a failed allocation: what the run needed (by `check_fits`'s last estimate)
    and the limit now in force, with what to change; no library text."""
    headroom = memory_headroom()
    needs = f"needs about {format_bytes(last_estimate[0])}" if last_estimate else "an allocation failed"
    limit = (f"{format_bytes(headroom[0])} free under the {headroom[1]}" if headroom is not None
             else "limit unknown")
    return (f"out of memory: {needs}, {limit}; use a smaller --tile or --batch, a lighter "
            "model or a smaller scale, or a machine with more memory")
