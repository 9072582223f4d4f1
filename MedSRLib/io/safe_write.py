"""Writes that cannot lie: a temporary file beside the target, checked, then renamed.

Every output (volume, PNG, JSON side file) goes through `Staged`: the content is written to a
hidden temporary file `.NAME.medsr-PID-RANDOM.partSUFFIX` in the target's folder, flushed to
disk (fsync: a full disk shows there at the latest), checked by a caller-given function (for
volumes: the whole payload is present), given the permissions the umask asks for, and only then
renamed onto the target. Without `overwrite` the rename refuses an existing target atomically
(hard link), so two runs racing to one path cannot replace each other. On any failure, cancel or
signal the temporary file is removed and the target is untouched; a temporary file left by a
killed process (SIGKILL, power loss) is removed by the next write into the same folder.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import InputError
from ..runtime.memory_budget import format_bytes

TEMP_MARK = ".medsr-"
_TEMP_PATTERN = re.compile(r"^\..+\.medsr-(\d+)-[^.]+\.part")
_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP"))
                 if s is not None)


#: Every target this process has committed, in order (the CLI tells a cancel that arrived
#: after an output was complete from one that left nothing).
COMMITTED: list[Path] = []
# Temporary files that exist right now (a process leaving at once on a signal removes them).
PENDING: set[Path] = set()


class WriteError(InputError):
    """An output could not be written completely (full disk, read-only folder, ...); nothing was
    left at the target."""


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block ends (a rename and its clean-up are not cut);
    a signal that came meanwhile is raised again, once, as the block ends.

    Held at the Python level (the handlers swapped for one that records the signal), not with
    `pthread_sigmask`: a mask holds a signal for the calling thread only, and the kernel hands
    a process-directed signal to any other thread (OpenVINO's, torch's), whose C handler makes
    the main thread raise at once. Python handlers run in the main thread only, so from another
    thread the block defers nothing and needs not to (no signal is raised there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {number: signal.getsignal(number) for number in _SIGNALS}
    for number in _SIGNALS:
        signal.signal(number, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        if held:
            signal.raise_signal(held[0])  # to this thread: the restored handler runs here


def pid_alive(pid: int) -> bool:
    """True while a process with this PID exists (the owner of a temporary file or folder)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove temporary files of earlier writes whose process no longer exists; returns them."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_PATTERN.match(entry.name)
        if match and entry.is_file(follow_symlinks=False) and not pid_alive(int(match.group(1))):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def describe_write_failure(path: Path, error: BaseException | str) -> str:
    """A message naming the path and the cause, saying "no space left" when the disk is full."""
    text = error if isinstance(error, str) else (
        os.strerror(error.errno) if isinstance(error, OSError) and error.errno else str(error))
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    reason = lines[-1] if lines else "unknown error"
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        free is not None and free < 1 << 20)
    if full:
        return (f"{path}: no space left on the device ({format_bytes(free or 0)} free); nothing "
                "was written (free some space or choose another folder)")
    return f"{path}: cannot write ({reason}); nothing was written"


def check_writable_folder(path: Path) -> None:
    """InputError unless a file can be created beside `path` (tried with a real temporary file:
    permissions, read-only mounts and ACLs all show)."""
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{path}: folder {folder} does not exist")
    try:
        descriptor, probe = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}{os.getpid()}-",
                                             suffix=".probe", dir=folder)
    except OSError as err:
        raise InputError(f"{path}: cannot write in folder {folder} ({os.strerror(err.errno) if err.errno else err})") from None
    os.close(descriptor)
    os.unlink(probe)


#: Smallest share of its raw size a compressed (gzip) output is taken to need: CT and MR
#: volumes seen compress to 20-60 %; a folder with less free space certainly cannot hold it.
COMPRESSED_SHARE = 0.1


def check_free_space(path: Path, raw_bytes: int, compressed: bool) -> None:
    """InputError naming the folder when the file system holding `path`'s folder has less free
    space than the output needs: `raw_bytes` (the voxel bytes), or `COMPRESSED_SHARE` of them
    for a compressed format. Checked before computing, so a full disk costs no work."""
    folder = Path(path).parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # the folder check reports a missing or unreadable folder
    needed = int(raw_bytes * (COMPRESSED_SHARE if compressed else 1.0))
    if free < needed:
        raise InputError(f"{folder}: no space left for the output {Path(path).name}: it needs "
                         f"about {format_bytes(needed)}"
                         + (f" (compressed; {format_bytes(raw_bytes)} uncompressed)" if compressed else "")
                         + f", {format_bytes(free)} free on that disk; nothing was written (free "
                         "some space or choose another folder)")


class Staged:
    """One output being written: `write(temp_path)` fills it, `verify(temp_path)` checks it,
    `commit()` puts it at the target; `discard()` (or an exception in `stage_all`) removes it."""

    def __init__(self, path: Path, suffix: str, write: Callable[[str], object],
                 verify: Callable[[str], None] | None = None, overwrite: bool = False):
        self.path = Path(path)
        self.overwrite = overwrite
        self.temp: Path | None = None
        self._suffix = suffix
        self._write = write
        self._verify = verify

    def prepare(self) -> "Staged":
        """Write and check the temporary file; WriteError (temporary removed) on failure."""
        if not self.overwrite and self.path.exists():
            raise InputError(f"{self.path}: output exists; pass --overwrite to replace it")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a folder, not a file name")
        remove_stale_temporaries(self.path.parent)
        try:
            with signals_deferred():  # a cancel between creating and recording it would leak it
                try:
                    descriptor, temp_name = tempfile.mkstemp(
                        prefix=f".{self.path.name}{TEMP_MARK}{os.getpid()}-",
                        suffix=f".part{self._suffix}", dir=self.path.parent)
                except OSError as err:
                    raise WriteError(describe_write_failure(self.path, err)) from None
                os.close(descriptor)
                self.temp = Path(temp_name)
                PENDING.add(self.temp)
            # a signal held during that block is raised here, inside the clean-up's reach
            try:
                self._write(temp_name)
                _fsync(self.temp)
            except OSError as err:
                raise WriteError(describe_write_failure(self.path, err)) from None
            except RuntimeError as err:  # ITK reports I/O failures as RuntimeError
                raise WriteError(describe_write_failure(self.path, str(err))) from None
            if self._verify is not None:
                try:
                    self._verify(temp_name)
                except InputError as err:
                    raise WriteError(describe_write_failure(
                        self.path, f"the written file is incomplete: {err}")) from None
            os.chmod(temp_name, 0o666 & ~current_umask())
        except BaseException:
            self.discard()
            raise
        return self

    def commit(self) -> Path:
        """Rename the checked temporary file onto the target (refusing an existing one unless
        `overwrite`); the temporary file is gone afterwards in every case."""
        assert self.temp is not None, "prepare() first"
        with signals_deferred():
            try:
                if self.overwrite:
                    os.replace(self.temp, self.path)
                else:
                    _link_no_clobber(self.temp, self.path)
                    self.temp.unlink(missing_ok=True)
                PENDING.discard(self.temp)
                fsync_folder(self.path.parent)
                COMMITTED.append(self.path)  # before signals are let through again
            except FileExistsError:
                self.discard()
                raise InputError(f"{self.path}: output appeared while this run was writing "
                                 "(another run?); pass --overwrite to replace it") from None
            except OSError as err:
                self.discard()
                raise WriteError(describe_write_failure(self.path, err)) from None
            self.temp = None
        return self.path

    def discard(self) -> None:
        with signals_deferred():
            if self.temp is not None:
                self.temp.unlink(missing_ok=True)
                PENDING.discard(self.temp)
                self.temp = None


def _link_no_clobber(source: Path, target: Path) -> None:
    """Make `target` name `source`'s file, FileExistsError if `target` exists (atomic)."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # no hard links here (some network/FAT file systems): best effort, not race-free
        if target.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
        os.rename(source, target)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_all(staged: Sequence[Staged]) -> list[Path]:
    """Prepare every output, then commit them all; if any preparation fails, none is written."""
    prepared: list[Staged] = []
    try:
        for item in staged:
            prepared.append(item.prepare())
        return [item.commit() for item in prepared]
    finally:
        for item in prepared:
            item.discard()
