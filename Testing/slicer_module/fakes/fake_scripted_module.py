"""FAKE `slicer.ScriptedLoadableModule`: minimal versions of Slicer's four base classes.

Real ones: Base/Python/slicer/ScriptedLoadableModule.py in Slicer. Only what MedSR.py uses.
"""

import logging
import os
import types
import unittest


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = self.moduleName
        parent.categories = []
        parent.dependencies = []
        parent.contributors = []
        parent.helpText = ""
        parent.acknowledgementText = ""

    def resourcePath(self, filename):
        import sys

        module_file = sys.modules[self.__class__.__module__].__file__
        return os.path.join(os.path.dirname(module_file), "Resources", filename)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        import qt

        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Widget"):
            self.moduleName = self.moduleName[: -len("Widget")]
        self.developerMode = False
        if parent is None:
            parent = qt.QWidget()
            parent.setLayout(qt.QVBoxLayout())
        self.parent = parent
        self.layout = parent.layout()

    def resourcePath(self, filename):
        import sys

        module_file = sys.modules[self.__class__.__module__].__file__
        return os.path.join(os.path.dirname(module_file), "Resources", filename)

    def setup(self):
        pass

    def cleanup(self):
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Logic"):
            self.moduleName = self.moduleName[: -len("Logic")]

    def getParameterNode(self):
        import slicer

        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetName(self.moduleName)
            node.SetSingletonTag(self.moduleName)
            node.SetModuleName(self.moduleName)
            node = slicer.mrmlScene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

    def delayDisplay(self, message, msec=1000):
        logging.info(message)

    def runTest(self):
        pass


def make_module():
    module = types.ModuleType("slicer.ScriptedLoadableModule")
    module.__doc__ = __doc__
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget,
                ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    module.__all__ = [cls.__name__ for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget,
                                               ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest)]
    return module
