"""A cancel (SIGINT) that arrives while an output's temporary file or folder is being created
is held until it is recorded, then raised where the clean-up reaches it: nothing is left
behind, not even a hidden temporary. The signal is delivered to another thread of the process,
as the kernel does when a worker thread (OpenVINO's, torch's) does not block it."""

from __future__ import annotations

import signal
import tempfile
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

from MedSRLib.io import dicom_export, safe_write, volumes as io

pytestmark = pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signals only")


@pytest.fixture
def worker_thread():
    """A second thread of this process that is alive for the test; SIGINT raises
    KeyboardInterrupt meanwhile (an earlier test of the session may have left it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    yield thread
    stop.set()
    thread.join()
    signal.signal(signal.SIGINT, previous)


def signal_after(function, thread: threading.Thread):
    """`function`, then SIGINT delivered to `thread` (a process-directed signal can land on any
    thread that does not block it)."""
    def creating(*args, **kwargs):
        made = function(*args, **kwargs)
        signal.pthread_kill(thread.ident, signal.SIGINT)
        time.sleep(0.05)  # the other thread's C handler has run; the main thread raises next
        return made
    return creating


def test_a_volume_write_cancelled_while_its_temporary_is_made_leaves_nothing(tmp_path, monkeypatch,
                                                                            worker_thread):
    monkeypatch.setattr(safe_write.tempfile, "mkstemp", signal_after(tempfile.mkstemp, worker_thread))
    image = sitk.GetImageFromArray(np.zeros((3, 8, 8), np.int16))
    with pytest.raises(KeyboardInterrupt):
        io.write_volume(image, tmp_path / "out.nrrd")
    assert list(tmp_path.iterdir()) == []
    assert not safe_write.PENDING


def test_a_series_write_cancelled_while_its_temporary_folder_is_made_leaves_nothing(tmp_path, monkeypatch,
                                                                                    worker_thread):
    monkeypatch.setattr(dicom_export.tempfile, "mkdtemp", signal_after(tempfile.mkdtemp, worker_thread))
    filled = []
    with pytest.raises(KeyboardInterrupt):
        dicom_export._write_folder(tmp_path / "series", False, 1, filled.append)
    assert filled == []  # the cancel came before any slice was written
    assert list(tmp_path.iterdir()) == []
