"""FAKE `qt` module: PySide6 exposed under PythonQt's flat module name."""

import types


def make_qt_module():
    from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets

    qt = types.ModuleType("qt")
    qt.__doc__ = "FAKE PythonQt `qt` module built from PySide6 for tests (Testing/slicer/fakes)."
    for source in (QtCore, QtGui, QtWidgets, QtUiTools):
        for name in dir(source):
            if not name.startswith("_"):
                setattr(qt, name, getattr(source, name))
    # PythonQt exposes objectName as the `name` attribute; slicer.util relies on it.
    if not isinstance(getattr(QtCore.QObject, "name", None), property):
        QtCore.QObject.name = property(lambda self: self.objectName())
    qt.QUiLoader = _SharedUiLoader
    return qt


class _CustomWidgetRegistry:
    classes = []


def _SharedUiLoader(*args):
    """A QUiLoader that knows the fake custom widgets (slicer.util.loadUI makes a new one)."""
    from PySide6.QtUiTools import QUiLoader

    loader = QUiLoader(*args)
    for widget_class in _CustomWidgetRegistry.classes:
        loader.registerCustomWidget(widget_class)
    return loader
