"""Headless harness for the MedSR Slicer module (see README.md in this folder).

Test modules import their fixtures from here (`from harness import MedSR, qapp, scene, widget`)
instead of a conftest.py, so that the library tests' `from conftest import ...` keeps
resolving to Testing/conftest.py when the whole Testing/ tree is collected.

Real: slicer-core's vtkMRMLScene and node classes, Slicer's slicer/util.py, PySide6's
QUiLoader reading MedSR.ui, MedSRLib. Fake (fakes/): qt name mapping, qMRML/CTK widgets,
slicer.app, the ScriptedLoadableModule base classes.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO_ROOT / "MedSRExtension" / "MedSR"

import pytest

# Without slicer-core / PySide6-Essentials every test module importing this one is skipped.
pytest.importorskip("slicer_core", reason="needs slicer-core (pip install slicer-core)")
pytest.importorskip("PySide6", reason="needs PySide6-Essentials")

for path in (REPO_ROOT, MODULE_DIR, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from fakes import install as _install_fakes  # noqa: E402

_install_fakes()


@pytest.fixture(scope="session")
def qapp():
    from PySide6.QtWidgets import QApplication

    return QApplication.instance() or QApplication([])


@pytest.fixture
def scene(qapp):
    """A fresh, real MRML scene as slicer.mrmlScene for each test."""
    import slicer

    slicer.mrmlScene = slicer.vtkMRMLScene()
    yield slicer.mrmlScene
    slicer.mrmlScene.Clear(1)


@pytest.fixture
def MedSR():
    import MedSR as module

    return module


@pytest.fixture
def widget(scene, MedSR, qapp):
    """The module panel, set up and shown on a fresh scene; cleaned up and closed after."""
    widget = MedSR.MedSRWidget()
    widget.setup()
    widget.parent.show()
    yield widget
    widget.cleanup()
    widget.parent.close()
