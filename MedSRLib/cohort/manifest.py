"""The cohort's manifest `OUT/medsr-batch.jsonl`: one JSON line per case and run, appended.

Each line records one case of one run: `input`, `series_uid`, `output` (relative to the
output folder), `status` ("ok", "failed" or "skipped": done by an earlier run), `error`,
`model`, `factors_xyz`, `seconds`, `peak_memory_mb` (peak resident memory of the worker
process during the case), `output_bytes` and `output_mtime_ns` (what MedSR wrote: a file at
an output path that no ok line describes is not MedSR's and is never replaced without
`overwrite`), `worker` (host:pid), `finished` (UTC time), `request` (the options that decide
the output) and `input_fingerprint`.

Lines are written by one process (the driver), each flushed and fsynced before the next case
is reported, so a killed run loses at most the line it was writing; a torn last line is
ignored on reading and the next line starts on a fresh line. A line that cannot be written (a
full disk) is cut off again and raised as `ManifestWriteError`: the manifest never holds half a
line written by a living run. The latest line of a case is its state.

While a run writes, it holds an exclusive lock (`flock`) on the output folder itself, not on
the manifest: deleting or replacing the manifest cannot let a second run in. A manifest that
is a symbolic link or not a regular file is refused, never followed.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io.safe_write import signals_deferred
from .cases import Case

MANIFEST_NAME = "medsr-batch.jsonl"

#: What a rerun does with a case: run it, skip it (done), or carry its failure over.
RUN, SKIP, CARRY_FAILURE = "run", "skip", "carry-failure"


def case_key(case: Case, out_dir: Path) -> str:
    """The output path as the manifest names it: relative to `out_dir` when inside it."""
    try:
        return case.output.relative_to(out_dir).as_posix()
    except ValueError:
        return str(case.output)


@dataclass
class ManifestState:
    """What a manifest says: `latest` line per case key, `written`: the latest ok/skipped line
    per key (what MedSR wrote there), and how many lines could not be read."""

    latest: dict[str, dict[str, Any]] = field(default_factory=dict)
    written: dict[str, dict[str, Any]] = field(default_factory=dict)
    unreadable: int = 0


def read_state(path: Path) -> ManifestState:
    """The manifest at `path` read (a missing one is empty); InputError when it is a symbolic
    link, not a regular file, or unreadable."""
    state = ManifestState()
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return state
    except OSError as err:
        raise _open_error(path, err) from None
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise InputError(f"{path}: the manifest is not a regular file; move it away")
        try:
            data = handle.read()
        except OSError as err:
            raise InputError(f"{path}: cannot read the manifest "
                             f"({os.strerror(err.errno or 0)})") from None
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            state.unreadable += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("output"), str) and \
                record.get("status") in ("ok", "failed", "skipped"):
            state.latest[record["output"]] = record
            if record["status"] != "failed":
                state.written[record["output"]] = record
        else:
            state.unreadable += 1
    return state


def read_records(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The latest record per case key, and how many lines could not be read (a torn line)."""
    state = read_state(path)
    return state.latest, state.unreadable


def _open_error(path: Path, err: OSError) -> InputError:
    if err.errno == errno.ELOOP:
        return InputError(f"{path}: the manifest is a symbolic link; medsr batch does not "
                          "follow it (it would write into the link's target): remove the link")
    return InputError(f"{path}: cannot open the manifest ({os.strerror(err.errno or 0)})")


def output_signature(path: Path) -> tuple[int, int] | None:
    """(bytes, newest modification time in ns) of an output file, or of the files in an output
    folder (a DICOM series); None when nothing is there. Symbolic links are not followed."""
    try:
        info = os.lstat(path)
        if stat.S_ISDIR(info.st_mode):
            entries = [e.stat(follow_symlinks=False) for e in os.scandir(path)
                       if e.is_file(follow_symlinks=False)]
            return (sum(e.st_size for e in entries), max((e.st_mtime_ns for e in entries),
                                                         default=info.st_mtime_ns))
        return info.st_size, info.st_mtime_ns
    except OSError:
        return None


def written_by_medsr(case: Case, written: dict[str, Any] | None) -> bool:
    """True when the file (or DICOM folder) at the case's output is the one an ok line
    recorded: same size and modification time (size only for lines without a time)."""
    signature = output_signature(case.output)
    if signature is None or written is None or written.get("output_bytes") != signature[0]:
        return False
    recorded_mtime = written.get("output_mtime_ns")
    return recorded_mtime is None or recorded_mtime == signature[1]


def decide(case: Case, out_dir: Path, record: dict[str, Any] | None, request: dict[str, Any],
           fingerprint: str, retry_failed: bool) -> str:
    """RUN, SKIP or CARRY_FAILURE for `case` given its latest manifest record.

    Done (SKIP) means: the record says ok (or skipped, which copies an ok), with the same
    request and input fingerprint, and the output is there as the record wrote it (size and
    modification time). A failure is carried over (not retried) while the request and input
    are unchanged, unless `retry_failed`. Whether a RUN may replace a file already at the
    output is the caller's question (`written_by_medsr`).
    """
    if record is None or record.get("request") != request or \
            record.get("input_fingerprint") != fingerprint:
        return RUN
    if record.get("status") == "failed":
        return RUN if retry_failed else CARRY_FAILURE
    return SKIP if written_by_medsr(case, record) else RUN


class ManifestWriteError(OSError):
    """A manifest line could not be written (full disk, ...); the manifest was cut back to its
    last whole line."""


class ManifestWriter:
    """Appends records to the manifest, one fsynced line each, while holding an exclusive lock
    on the output folder. `replaced` is set when the manifest was deleted or replaced during the
    run (it is created again and holds the lines written since)."""

    def __init__(self, path: Path):
        self.path = path
        self.replaced = False
        self._descriptor: int | None = None
        self._folder_lock: int | None = None

    def __enter__(self) -> "ManifestWriter":
        self._lock_folder()
        try:
            self._open(create_new=False)
            try:
                self._end_torn_line()
            except ManifestWriteError as err:
                raise InputError(str(err.strerror)) from None
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _lock_folder(self) -> None:
        folder = self.path.parent
        try:
            self._folder_lock = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise InputError(f"{folder}: cannot open the output folder "
                             f"({os.strerror(err.errno or 0)})") from None
        try:
            import fcntl
            fcntl.flock(self._folder_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._folder_lock)
            self._folder_lock = None
            raise InputError(f"{folder}: another `medsr batch` is writing into this folder; "
                             "wait for it or choose another output folder") from None
        except (ImportError, OSError):  # no flock (some network file systems): unlocked
            pass

    def _open(self, create_new: bool) -> None:
        flags = (os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                 | os.O_CLOEXEC | (os.O_EXCL if create_new else 0))
        try:
            descriptor = os.open(self.path, flags, 0o644)
        except OSError as err:
            raise _open_error(self.path, err) from None
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            raise InputError(f"{self.path}: the manifest is not a regular file; move it away")
        self._descriptor = descriptor

    def _end_torn_line(self) -> None:
        """A torn last line of a killed run: the next line starts on a fresh line."""
        assert self._descriptor is not None
        size = os.fstat(self._descriptor).st_size
        if size > 0 and os.pread(self._descriptor, 1, size - 1) != b"\n":
            self._write(b"\n")

    def _still_ours(self) -> bool:
        assert self._descriptor is not None
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        mine = os.fstat(self._descriptor)
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def append(self, record: dict[str, Any]) -> None:
        """Write one line, fsynced; ManifestWriteError (the manifest unchanged) when it cannot
        be written; InputError when the manifest was replaced by something not a file."""
        with signals_deferred():  # an interrupt waits until the line is on disk
            if not self._still_ours():  # deleted or replaced while this run writes
                os.close(self._descriptor)
                self._descriptor = None
                self.replaced = True
                self._open(create_new=True)
            self._write((json.dumps(record) + "\n").encode("utf-8"))

    def _write(self, data: bytes) -> None:
        descriptor = self._descriptor
        assert descriptor is not None
        size_before = os.fstat(descriptor).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
            os.fsync(descriptor)
        except OSError as err:
            try:
                os.ftruncate(descriptor, size_before)  # no half line is left behind
            except OSError:
                pass
            raise ManifestWriteError(err.errno, f"{self.path}: cannot write the manifest "
                                     f"({os.strerror(err.errno or 0)})") from None

    def __exit__(self, *exc_info) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
        if self._folder_lock is not None:
            os.close(self._folder_lock)  # closing releases the lock
            self._folder_lock = None
