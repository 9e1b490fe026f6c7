"""Stand-in for `slicer.util`: only functions of slicer_util_functions.txt that UniversalSeg calls (see README.md).

Calls that would open a dialog or run pip are recorded in `_log`; `_answers` feeds confirmation dialogs.
"""

from __future__ import annotations

import contextlib
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import ctk
import numpy as np
import qt

_log: dict[str, list] = {"errorDisplay": [], "infoDisplay": [], "warningDisplay": [], "confirm": [],
                         "pip_install": [], "pip_uninstall": [], "exportNode": [], "launchConsoleProcess": []}
_answers: list[bool] = []  # answers of the next confirm dialogs (default: yes)


# --- .ui files -------------------------------------------------------------------------------------


def _widget_class(name: str):
    import slicer

    for namespace in (qt, ctk, slicer):
        if hasattr(namespace, name):
            return getattr(namespace, name)
    raise TypeError(f"the stand-in has no widget class {name} (used in the .ui file)")


def _value(prop: ET.Element):
    child = prop[0]
    if child.tag == "string":
        return child.text or ""
    if child.tag == "bool":
        return child.text == "true"
    if child.tag == "stringlist":
        return [s.text or "" for s in child]
    if child.tag == "number":
        return int(child.text)
    return child.text


def _build(element: ET.Element, all_widgets: list):
    widget = _widget_class(element.get("class"))()
    widget.name = element.get("name")
    all_widgets.append(widget)
    for prop in element.findall("property"):
        name, value = prop.get("name"), _value(prop)
        if prop.get("stdset") == "0":
            widget.setProperty(name, value)
        elif name == "text" and hasattr(widget, "setText"):
            widget.setText(value)
        elif name == "enabled":
            widget.setEnabled(value)
        elif name == "toolTip":
            widget.setToolTip(value)
        elif name == "placeholderText" and hasattr(widget, "setPlaceholderText"):
            widget.setPlaceholderText(value)
        elif name in ("nodeTypes", "noneEnabled", "addEnabled", "removeEnabled", "showChildNodeTypes", "collapsed",
                      "noneDisplay", "renameEnabled", "editEnabled", "baseName", "checked"):
            setattr(widget, name, value)
    columns = [c.find("property/string").text for c in element.findall("column")]
    if columns and hasattr(widget, "setHorizontalHeaderLabels"):
        widget.setHorizontalHeaderLabels(columns)
    for child in element.iter():
        if child is not element and child.tag == "widget" and _nearest_widget_parent(element, child):
            widget.children.append(_build(child, all_widgets))
    return widget


def _nearest_widget_parent(parent: ET.Element, child: ET.Element) -> bool:
    """Whether `child` is a widget directly under `parent` (through layouts and items only)."""
    def walk(node, depth_ok):
        for sub in node:
            if sub is child:
                return depth_ok
            if sub.tag in ("layout", "item"):
                if walk(sub, depth_ok):
                    return True
        return False
    return walk(parent, True)


def loadUI(path):
    """Build the widget tree of a Qt Designer file."""
    root = ET.parse(path).getroot()
    widgets: list = []
    top = _build(root.find("widget"), widgets)
    top._all = widgets
    by_name = {w.name: w for w in widgets}
    for connection in root.iter("connection"):
        sender, receiver = by_name[connection.find("sender").text], by_name[connection.find("receiver").text]
        signal, slot = connection.find("signal").text, connection.find("slot").text
        sender.connect(signal, getattr(receiver, slot.split("(")[0]))
    return top


def childWidgetVariables(widget):
    """Mimics Base/Python/slicer/util.py childWidgetVariables."""
    ui = type("", (), {})()
    for child in widget._all:
        if child.name:
            setattr(ui, child.name, child)
    return ui


# --- nodes and files ---------------------------------------------------------------------------------


def exportNode(node, filename, properties=None, world=False):
    """Base/Python/slicer/util.py exportNode: writes the node's data, in local coordinates unless `world`
    (the stand-in records each call's `world`; it has no transforms to harden)."""
    import SimpleITK as sitk

    _log["exportNode"].append({"node": node.GetID(), "filename": str(filename), "world": world})
    if getattr(node, "image", None) is None:
        return False
    sitk.WriteImage(node.image, str(filename))
    return True


def loadVolume(filename, properties=None, returnNode=False):
    """Base/Python/slicer/util.py loadVolume: a volume node with a storage node that has just read it."""
    import SimpleITK as sitk

    import slicer

    name = (properties or {}).get("name", Path(filename).name.split(".")[0])
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.image = sitk.ReadImage(str(filename))
    _attach_storage(node, "vtkMRMLVolumeArchetypeStorageNode", filename)
    return node


def _attach_storage(node, storageClass: str, filename) -> None:
    """What loadNodeFromFile leaves behind (qSlicerCoreIOManager::loadNodes): a storage node pointing at the
    file, and the node not modified since read (so the Save dialog leaves it unticked)."""
    import slicer

    storage = slicer.mrmlScene.AddNewNodeByClass(storageClass)
    storage.SetFileName(str(filename))
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.markRead()


def loadSegmentation(filename, properties=None, returnNode=False):
    """Base/Python/slicer/util.py loadSegmentation (vtkMRMLSegmentationStorageNode::ReadDataInternal): the
    segments with ids, names, colours and their tags exactly as written in the file (the terminology
    string is not re-serialised), each mask on the file's grid (origin, spacing and axis directions of
    the file), a display node, and a storage node pointing at the file."""
    import nrrd
    import SimpleITK as sitk
    import slicerio

    import slicer

    data = slicerio.read_segmentation(str(filename))
    header = nrrd.read_header(str(filename))
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", (properties or {}).get("name", "Segmentation"))
    node.CreateDefaultDisplayNodes()
    ijk_to_lps = np.asarray(data["ijkToLPS"], float)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    for index, segment in enumerate(data.get("segments", [])):
        tags = dict(t.split(":", 1) for t in header.get(f"Segment{index}_Tags", "").split("|") if ":" in t)
        node.segmentation.segments[segment["id"]] = slicer.vtkSegment(
            segment.get("name", segment["id"]), tuple(segment.get("color", (0.5, 0.5, 0.5))), tags)
        mask = slicerio.segment_mask(data, segment).transpose(2, 1, 0)  # (i, j, k) -> SimpleITK's (z, y, x)
        grid = sitk.Image([int(v) for v in mask.shape[::-1]], sitk.sitkUInt8)
        grid.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])
        grid.SetSpacing([float(v) for v in spacing])
        grid.SetDirection([float(v) for v in (ijk_to_lps[:3, :3] / spacing).flatten()])
        node.segmentation.masks[segment["id"]] = mask.astype(bool)
        node.segmentation.grids[segment["id"]] = grid
    _attach_storage(node, "vtkMRMLSegmentationStorageNode", filename)
    return node


def arrayFromVolume(volumeNode):
    """Mimics Base/Python/slicer/util.py arrayFromVolume."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(volumeNode.image)


_now = None  # tests may set a function returning a fixed datetime


def tempDirectory(key="__SlicerTemp__", tempDir=None, includeDateTime=True):
    """Base/Python/slicer/util.py tempDirectory: `key` + the time to the millisecond under
    slicer.app.temporaryPath; an existing folder of the same name is reused (QDir.mkpath)."""
    import datetime

    import slicer

    base = Path(tempDir or slicer.app.temporaryPath)
    now = (_now or datetime.datetime.now)()
    name = key + (now.strftime("%Y-%m-%d_%H+%M+%S.") + f"{now.microsecond // 1000:03d}" if includeDateTime else "")
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


class _FinishedProcess:
    """What launchConsoleProcess returns, for a command the stand-in does not run."""

    def __init__(self, returncode: int = 0):
        self.returncode = returncode
        self.stdout = iter(())

    def wait(self):
        return self.returncode


_process_results: list[int] = []  # exit codes of the next launched processes (default 0)


def launchConsoleProcess(args, useStartupEnvironment=True, updateEnvironment=None, cwd=None, blocking=True,
                         logCallback=None, completedCallback=None):
    """Base/Python/slicer/util.py launchConsoleProcess: recorded, not run."""
    _log["launchConsoleProcess"].append(list(args))
    return _FinishedProcess(_process_results.pop(0) if _process_results else 0)


def logProcessOutput(proc, logCallback=None):
    """Base/Python/slicer/util.py logProcessOutput: raises CalledProcessError on a non-zero exit code."""
    from subprocess import CalledProcessError

    if proc.wait() != 0:
        raise CalledProcessError(proc.returncode, "launched process")


# --- settings, environment, dialogs, pip ---------------------------------------------------------------


def settingsValue(key, default, converter=lambda v: v, settings=None):
    """Mimics Base/Python/slicer/util.py settingsValue."""
    settings = qt.QSettings() if settings is None else settings
    return converter(settings.value(key)) if settings.contains(key) else default


def startupEnvironment():
    """Mimics Base/Python/slicer/util.py startupEnvironment."""
    return dict(os.environ)


def mainWindow():
    """Mimics Base/Python/slicer/util.py mainWindow (None: no main window here, as with --no-main-window)."""
    return None


def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    """Mimics Base/Python/slicer/util.py errorDisplay (recorded in _log)."""
    _log["errorDisplay"].append(str(text))


def infoDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    """Mimics Base/Python/slicer/util.py infoDisplay (recorded in _log)."""
    _log["infoDisplay"].append(str(text))


def warningDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    """Mimics Base/Python/slicer/util.py warningDisplay (recorded in _log)."""
    _log["warningDisplay"].append(str(text))


def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
    """Mimics Base/Python/slicer/util.py confirmOkCancelDisplay (answers from _answers, recorded in _log)."""
    _log["confirm"].append((str(text), kwargs.get("detailedText", "")))
    return _answers.pop(0) if _answers else True


def confirmYesNoDisplay(text, windowTitle=None, parent=None, **kwargs):
    """Mimics Base/Python/slicer/util.py confirmYesNoDisplay."""
    return confirmOkCancelDisplay(text, windowTitle, parent, **kwargs)


@contextlib.contextmanager
def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
    """Mimics Base/Python/slicer/util.py tryWithErrorDisplay: shows the error, then re-raises."""
    try:
        yield
    except Exception as e:
        if show:
            errorDisplay(f"{message}\n\n{e}" if message else str(e))
        raise


def pip_install(requirements):
    """Mimics Base/Python/slicer/util.py pip_install (-> slicer/packaging.py pip_install): recorded, not run."""
    _log["pip_install"].append(requirements)


def pip_uninstall(requirements):
    """Mimics Base/Python/slicer/util.py pip_uninstall (recorded, not run)."""
    _log["pip_uninstall"].append(requirements)


class VTKObservationMixin:
    """Distinct from ScriptedLoadableModuleWidget, as in Slicer (else the module's MRO would fail)."""

    def __init__(self):
        super().__init__()
        self.Observations: list = []

    def addObserver(self, obj, event, method, group="none", priority=0.0):
        """Mimics Base/Python/slicer/util.py VTKObservationMixin.addObserver."""
        tag = obj.AddObserver(event, method, priority)
        self.Observations.append([obj, event, method, group, tag, priority])

    def removeObserver(self, obj, event, method):
        """Mimics Base/Python/slicer/util.py VTKObservationMixin.removeObserver."""
        for o in list(self.Observations):
            if o[0] is obj and o[1] == event and o[2] == method:
                obj.RemoveObserver(o[4])
                self.Observations.remove(o)

    def removeObservers(self, method=None):
        """Mimics Base/Python/slicer/util.py VTKObservationMixin.removeObservers."""
        for o in list(self.Observations):
            if method is None or o[2] == method:
                o[0].RemoveObserver(o[4])
                self.Observations.remove(o)
