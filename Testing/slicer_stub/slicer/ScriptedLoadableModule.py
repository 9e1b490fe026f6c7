"""Stand-in for slicer.ScriptedLoadableModule: the four base classes, as distinct plain classes (see README.md)."""

from __future__ import annotations

import os
import sys
import unittest

import qt

import slicer


class ScriptedLoadableModule:
    """Mimics Base/Python/slicer/ScriptedLoadableModule.py ScriptedLoadableModule."""

    def __init__(self, parent):
        super().__init__()
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = []
        parent.helpText = ""
        parent.acknowledgementText = ""

    def resourcePath(self, filename):
        return os.path.join(os.path.dirname(self.parent.path), "Resources", filename)


class ScriptedLoadableModuleWidget:
    """Mimics Base/Python/slicer/ScriptedLoadableModule.py ScriptedLoadableModuleWidget."""

    def __init__(self, parent=None):
        super().__init__()
        self.moduleName = self.__class__.__name__.removesuffix("Widget")
        created = parent is None
        if created:
            parent = slicer.qMRMLWidget()
            parent.setLayout(qt.QVBoxLayout())
        self.parent = parent
        self.parent.isEntered = True
        self.layout = self.parent.layout()
        if created:  # as in Slicer: a widget made without a parent sets itself up at once
            self.setup()

    def resourcePath(self, filename):
        module_file = sys.modules[type(self).__module__].__file__
        return os.path.join(os.path.dirname(module_file), "Resources", filename)

    def setup(self):
        pass

    def cleanup(self):
        pass


class ScriptedLoadableModuleLogic:
    """Mimics Base/Python/slicer/ScriptedLoadableModule.py ScriptedLoadableModuleLogic."""

    def __init__(self, parent=None):
        super().__init__()
        self.moduleName = self.__class__.__name__.removesuffix("Logic")
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            slicer.mrmlScene.setSingleton(self.moduleName, node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    """Base/Python/slicer/ScriptedLoadableModule.py ScriptedLoadableModuleTest: runTest() runs every method
    whose name contains "test" (moduleTestNames), each after setUp()."""

    def __init__(self, *args, **kwargs):
        self.moduleTestNames = []
        super().__init__(*args, **kwargs)
        if not self.moduleTestNames:
            self.moduleTestNames = [m for m in dir(self) if "test" in m and callable(getattr(self, m))]

    def runTest(self):
        for name in self.moduleTestNames:
            self.setUp()
            getattr(self, name)()
            self.tearDown()

    def delayDisplay(self, message, requestedDelay=None, msec=None):
        print(message)
