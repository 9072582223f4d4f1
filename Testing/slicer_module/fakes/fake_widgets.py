"""FAKE qMRML/CTK widgets for loading MedSR.ui with PySide6's QUiLoader.

Only the API MedSR.py uses: qMRMLNodeComboBox (nodeTypes, noneEnabled, noneDisplay,
setMRMLScene, currentNode, setCurrentNode, currentNodeChanged) and ctkCollapsibleButton
(text, collapsed). The real widgets live in Slicer's Libs/MRML/Widgets and CTK.
"""

from PySide6.QtCore import Property, Signal
from PySide6.QtWidgets import QComboBox, QGroupBox


class qMRMLNodeComboBox(QComboBox):
    """FAKE: lists the scene's nodes of `nodeTypes`; item data = node ID."""

    currentNodeChanged = Signal(object)
    currentNodeIDChanged = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None
        self._observers = []
        self._nodeTypes = []
        self._flags = {"noneEnabled": False, "addEnabled": False, "removeEnabled": False,
                       "renameEnabled": False, "showChildNodeTypes": True}
        self._noneDisplay = "None"
        self._baseName = ""
        self.currentIndexChanged.connect(self._emitCurrentNode)

    # properties set from the .ui
    def _getNodeTypes(self):
        return list(self._nodeTypes)

    def _setNodeTypes(self, types):
        self._nodeTypes = list(types)
        self._refresh()

    nodeTypes = Property(list, _getNodeTypes, _setNodeTypes)

    def _flag(name):  # noqa: N805 (class-body helper)
        return Property(bool, lambda self: self._flags[name],
                        lambda self, value: (self._flags.__setitem__(name, bool(value)), self._refresh()))

    noneEnabled = _flag("noneEnabled")
    addEnabled = _flag("addEnabled")
    removeEnabled = _flag("removeEnabled")
    renameEnabled = _flag("renameEnabled")
    showChildNodeTypes = _flag("showChildNodeTypes")
    del _flag

    def _getNoneDisplay(self):
        return self._noneDisplay

    def _setNoneDisplay(self, text):
        self._noneDisplay = text
        self._refresh()

    noneDisplay = Property(str, _getNoneDisplay, _setNoneDisplay)
    baseName = Property(str, lambda self: self._baseName, lambda self, v: setattr(self, "_baseName", v))

    # scene
    def setMRMLScene(self, scene):
        import vtk

        for observed, tag in self._observers:
            observed.RemoveObserver(tag)
        self._observers = []
        self._scene = scene
        if scene is not None:
            for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, vtk.vtkCommand.ModifiedEvent):
                self._observers.append((scene, scene.AddObserver(event, lambda *args: self._refresh())))
        self._refresh()

    def mrmlScene(self):
        return self._scene

    def nodes(self):
        if self._scene is None:
            return []
        found = []
        for i in range(self._scene.GetNumberOfNodes()):
            node = self._scene.GetNthNode(i)
            if any(self._matches(node, t) for t in self._nodeTypes) and not node.GetHideFromEditors():
                found.append(node)
        return found

    def _matches(self, node, nodeType):
        if self._flags["showChildNodeTypes"]:
            return node.IsA(nodeType)
        return node.GetClassName() == nodeType

    def _refresh(self):
        currentID = self.currentNodeID()
        self.blockSignals(True)
        self.clear()
        if self._flags["noneEnabled"]:
            self.addItem(self._noneDisplay, "")
        for node in self.nodes():
            self.addItem(node.GetName(), node.GetID())
        index = self.findData(currentID) if currentID else -1
        if index < 0 and not self._flags["noneEnabled"] and self.count() > 0:
            index = 0  # like qMRMLNodeComboBox: select the first node when None is not allowed
        self.setCurrentIndex(max(index, 0) if self.count() else -1)
        self.blockSignals(False)
        if self.currentNodeID() != currentID:
            self._emitCurrentNode()

    def currentNodeID(self):
        data = self.currentData()
        return data or ""

    def currentNode(self):
        nodeID = self.currentNodeID()
        return self._scene.GetNodeByID(nodeID) if nodeID and self._scene is not None else None

    def setCurrentNode(self, node):
        self.setCurrentNodeID(node.GetID() if node is not None else "")

    def setCurrentNodeID(self, nodeID):
        index = self.findData(nodeID or "")
        if index >= 0:
            self.setCurrentIndex(index)

    def _emitCurrentNode(self, *args):
        self.currentNodeChanged.emit(self.currentNode())
        self.currentNodeIDChanged.emit(self.currentNodeID())


class ctkCollapsibleButton(QGroupBox):
    """FAKE: a group box whose `text` is the title; `collapsed` hides nothing (tests only)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._collapsed = False

    text = Property(str, lambda self: self.title(), lambda self, value: self.setTitle(value))
    collapsed = Property(bool, lambda self: self._collapsed, lambda self, v: setattr(self, "_collapsed", bool(v)))


def register(qt_module):
    from .fake_qt import _CustomWidgetRegistry

    _CustomWidgetRegistry.classes[:] = [qMRMLNodeComboBox, ctkCollapsibleButton]
    qt_module.qMRMLNodeComboBox = qMRMLNodeComboBox
