"""The cohort's manifest `OUT/medsr-batch.jsonl`: one JSON line per case and run, appended.

Each line records one case of one run: `input`, `series_uid`, `output` (relative to the
output folder), `status` ("ok", "failed" or "skipped": done by an earlier run), `error`,
`model`, `factors_xyz`, `seconds`, `peak_memory_mb` (peak resident memory of the worker
process during the case), `output_bytes`, `worker` (host:pid), `finished` (UTC time),
`request` (the options that decide the output) and `input_fingerprint`.

Lines are written by one process (the driver), each flushed and fsynced before the next case
is reported, so a killed run loses at most the line it was writing; a torn last line is
ignored on reading and the next line starts on a fresh line. The latest line of a case is its
state. While a run writes, it holds an exclusive lock on the manifest: a second run into the
same folder is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..safe_write import signals_deferred
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


def read_records(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The latest record per case key, and how many lines could not be read (a torn line)."""
    records: dict[str, dict[str, Any]] = {}
    unreadable = 0
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return records, 0
    except OSError as err:
        raise InputError(f"{path}: cannot read the manifest ({os.strerror(err.errno or 0)})") from None
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            unreadable += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("output"), str) and \
                record.get("status") in ("ok", "failed", "skipped"):
            records[record["output"]] = record
        else:
            unreadable += 1
    return records, unreadable


def decide(case: Case, out_dir: Path, record: dict[str, Any] | None, request: dict[str, Any],
           fingerprint: str, retry_failed: bool) -> str:
    """RUN, SKIP or CARRY_FAILURE for `case` given its latest manifest record.

    Done (SKIP) means: the record says ok (or skipped, which copies an ok), with the same
    request and input fingerprint, and the output file exists with the size the record wrote.
    Outputs are renamed into place only when complete, so a different size means the file was
    changed since (a truncated copy, another program): the case runs again and replaces it; so
    does a case whose output exists without an ok record (killed between the write and its
    line, or a file that was there before). A failure is carried over (not retried) while the
    request and input are unchanged, unless `retry_failed`.
    """
    if record is None or record.get("request") != request or \
            record.get("input_fingerprint") != fingerprint:
        return RUN
    if record.get("status") == "failed":
        return RUN if retry_failed else CARRY_FAILURE
    from .runners import output_bytes
    size = output_bytes(case.output)
    return SKIP if size is not None and size == record.get("output_bytes") else RUN


class ManifestWriter:
    """Appends records to the manifest, one fsynced line each, under an exclusive lock."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def __enter__(self) -> "ManifestWriter":
        try:
            self._file = open(self.path, "a+b")
        except OSError as err:
            raise InputError(f"{self.path}: cannot write the manifest "
                             f"({os.strerror(err.errno or 0)})") from None
        try:
            import fcntl
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise InputError(f"{self.path}: another `medsr batch` is writing into this folder; "
                             "wait for it or choose another output folder") from None
        except (ImportError, OSError):  # no flock (some network file systems): unlocked
            pass
        self._file.seek(0, os.SEEK_END)
        if self._file.tell() > 0:  # a torn last line of a killed run: start a fresh line
            self._file.seek(-1, os.SEEK_END)
            if self._file.read(1) != b"\n":
                self._file.seek(0, os.SEEK_END)
                self._write(b"\n")
        return self

    def append(self, record: dict[str, Any]) -> None:
        with signals_deferred():  # an interrupt waits until the line is on disk
            self._write((json.dumps(record) + "\n").encode("utf-8"))

    def _write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def __exit__(self, *exc_info) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None
