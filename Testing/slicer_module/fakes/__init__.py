"""FAKES of the parts of 3D Slicer that `slicer-core` from PyPI does not provide.

These are test doubles, not Slicer: just enough to load `MedSR.py` and its real `.ui` in
CI. The MRML scene, the node classes and `slicer.util` are the real ones from slicer-core.

- `qt`: PySide6 (QtCore, QtGui, QtWidgets, QtUiTools) under PythonQt's module name, with
  QObject.name = objectName as in PythonQt (slicer.util.childWidgetVariables relies on it).
- `qMRMLNodeComboBox`, `ctkCollapsibleButton`: small PySide6 widgets registered with the
  QUiLoader that `slicer.util.loadUI` uses (fake_widgets.py).
- `slicer.app`: testing mode on, cursor and event-loop calls (fake_app.py).
- `slicer.ScriptedLoadableModule`: the four base classes, minimal (fake_scripted_module.py).
- `slicer.dicomDatabase`: fileForInstance / fileValue over a dict, installed per test
  (fake_dicom_database.py; Slicer has one only once its DICOM module has opened a database).
"""

import sys
import types


def install():
    """Register the fakes in sys.modules / on the real `slicer` package; idempotent."""
    import slicer

    if getattr(slicer, "_medsr_fakes_installed", False):
        return
    from . import fake_app, fake_qt, fake_scripted_module, fake_widgets

    qt = fake_qt.make_qt_module()
    sys.modules["qt"] = qt
    fake_widgets.register(qt)
    ctk = types.ModuleType("ctk")
    ctk.__doc__ = "FAKE ctk module for tests (see Testing/slicer/fakes)."
    ctk.ctkCollapsibleButton = fake_widgets.ctkCollapsibleButton
    sys.modules["ctk"] = ctk

    slicer.app = fake_app.FakeSlicerApplication()
    slicer.modules = types.SimpleNamespace()
    module = fake_scripted_module.make_module()
    sys.modules["slicer.ScriptedLoadableModule"] = module
    slicer.ScriptedLoadableModule = module
    slicer.mrmlScene = slicer.vtkMRMLScene()
    slicer._medsr_fakes_installed = True
