"""Shared fixtures: paths to the real data in ../shared/data and small synthetic volumes."""

from __future__ import annotations

import atexit
import locale
import os
import shutil
import tempfile
from pathlib import Path

# NNCF compiles a C++ extension on first use under a 60 s limit, which a fresh, loaded 2-core
# machine can exceed (Testing/test_int8.py then fails with ExtensionLoaderTimeoutException);
# the limit is read when the extension loads, so it is raised here, before any test imports NNCF.
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "1200")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDSR_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
# Converted OpenVINO models of this test session go to a folder of its own, not the user's cache.
if "MEDSR_CACHE_DIR" not in os.environ:  # removed when the session ends
    os.environ["MEDSR_CACHE_DIR"] = tempfile.mkdtemp(prefix="medsr-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MEDSR_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True)
def keep_character_locale():
    """Each test starts with the process's character locale: SimpleITK's DICOM writer (GDCM),
    which tests use to make DICOM inputs, switches it to "C" (ASCII) process-wide, which would
    change how later tests decode text (e.g. a subprocess's UTF-8 output)."""
    before = locale.setlocale(locale.LC_CTYPE)
    yield
    if locale.setlocale(locale.LC_CTYPE) != before:
        locale.setlocale(locale.LC_CTYPE, before)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: one torch thread avoids contention on a 2-core machine (3-5x faster)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


#: Start of the skip reason of every test that needs the real data (counted at the end).
NO_SHARED_DATA = "real data folder"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{NO_SHARED_DATA} {SHARED_DATA} is not present")
    return SHARED_DATA


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Once, at the end: how many tests skipped for want of the real data, and where it comes
    from (each test's own reason is in pytest's short summary)."""
    skipped = [report for report in terminalreporter.stats.get("skipped", [])
               if NO_SHARED_DATA in str(getattr(report, "longrepr", ""))]
    if not skipped:
        return
    terminalreporter.write_line(
        f"{len(skipped)} test{'s' if len(skipped) > 1 else ''} skipped for want of the real images "
        f"in {SHARED_DATA} (public CT, "
        "MR and X-ray data listed in its MANIFEST.md, kept beside the repository as "
        "../shared/data, not in it); set MEDSR_SHARED_DATA to another copy to run them.",
        yellow=True)


def make_volume(shape_kji=(6, 20, 24), dtype=np.int16, spacing=(0.8, 0.9, 3.0),
                origin=(-10.0, 20.0, 5.5), direction=None, seed=0) -> sitk.Image:
    """A smooth random volume with anatomy-like range, geometry set (x, y, z order)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape_kji)
    kernel = np.ones(3) / 3.0
    for axis in (a for a in range(3) if shape_kji[a] >= 3):
        base = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), axis, base)
    values = base / (np.abs(base).max() + 1e-9) * 800.0
    if np.issubdtype(np.dtype(dtype), np.unsignedinteger):
        values = values + 1000.0
    image = sitk.GetImageFromArray(values.astype(dtype))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(tuple(np.asarray(direction, dtype=float).reshape(-1)))
    return image


def oblique_direction(angle_deg: float = 25.0, tilt_deg: float = 10.0) -> np.ndarray:
    """A proper rotation matrix (det +1) that is not axis-aligned."""
    a, t = np.radians(angle_deg), np.radians(tilt_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    return rz @ rx


@pytest.fixture
def small_ct() -> sitk.Image:
    return make_volume()
