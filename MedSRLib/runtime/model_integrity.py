"""SHA-256 checks of the model files the runtime loads (OpenVINO IR, compiled blobs, int8 IR).

A model file that changed after it was written (a flipped bit on disk, a half-copied cache, a
tampered download) must never run: OpenVINO reads such a file without complaint and returns
nonsense (every voxel at the limits of its type). Two kinds of files are checked:

- files MedSR writes into its cache (converted IR, compiled blobs): their hashes are recorded
  in a side file `<name>.sha256.json` written (atomically) after the files themselves; a cached
  file whose hash does not match, or that has no record, is deleted and made again;
- files that ship or that a user gives (int8 IR beside the weights): their hashes are in the
  model card; a mismatch refuses the run (`WeightsError`, naming the file).

Hashes are memoised per process by (path, size, modification time), so a file is read once.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Iterable

from ..errors import WeightsError

#: Suffix of the side file holding the hashes of a cache entry's files.
RECORD_SUFFIX = ".sha256.json"

_HASHES: dict[tuple, str] = {}
_LOCK = threading.Lock()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes (read in 1 MB chunks; memoised per file identity)."""
    path = Path(path)
    stat = path.stat()
    identity = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _LOCK:
        if identity in _HASHES:
            return _HASHES[identity]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _LOCK:
        _HASHES[identity] = value
    return value


def record_path(anchor: Path) -> Path:
    """The side file recording the hashes of the cache entry named by `anchor`."""
    return anchor.with_name(anchor.name + RECORD_SUFFIX)


def write_record(anchor: Path, files: Iterable[Path]) -> None:
    """Record the SHA-256 of each of `files` (same folder as `anchor`) beside `anchor`; written to
    a temporary file and renamed, so a record is either whole or absent. OSError if unwritable."""
    hashes = {Path(f).name: file_sha256(f) for f in files}
    target = record_path(anchor)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temp, target)


def matches_record(anchor: Path, files: Iterable[Path]) -> bool:
    """True when the record beside `anchor` exists and lists exactly these files with their
    current hashes; False for a missing, unreadable or mismatching record, or a missing file."""
    try:
        recorded = json.loads(record_path(anchor).read_text(encoding="utf-8"))
        files = [Path(f) for f in files]
        return (isinstance(recorded, dict) and set(recorded) == {f.name for f in files}
                and all(recorded[f.name] == file_sha256(f) for f in files))
    except (OSError, ValueError):
        return False


def remove_entry(anchor: Path, files: Iterable[Path]) -> None:
    """Delete a cache entry's files and its record (missing ones are ignored)."""
    for path in [*files, record_path(anchor)]:
        try:
            Path(path).unlink()
        except OSError:
            pass


def check_shipped(path: Path, expected_sha256: str, card_name: str) -> None:
    """WeightsError naming `path` unless its SHA-256 equals `expected_sha256` (recorded in the
    model card `card_name`)."""
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise WeightsError(f"{path}: file is damaged or was changed: its SHA-256 {actual[:16]}... "
                           f"differs from {expected_sha256[:16]}... recorded in {card_name}; "
                           "restore the file (reinstall MedSR, or remake it)")
