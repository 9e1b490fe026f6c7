"""Stand-in for `slicer.util`: only functions of slicer_util_functions.txt that UniversalSeg calls (see README.md).

Calls that would open a dialog or run pip are recorded in `_log`; `_answers` feeds confirmation dialogs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import ctk
import qt

_log: dict[str, list] = {"errorDisplay": [], "infoDisplay": [], "warningDisplay": [], "confirm": [],
                         "pip_install": [], "pip_uninstall": []}
_answers: list[bool] = []  # answers of the next confirm dialogs (default: yes)
_counter = itertools.count()


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
        elif name in ("nodeTypes", "noneEnabled", "addEnabled", "removeEnabled", "showChildNodeTypes", "collapsed"):
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
    ui = type("", (), {})()
    for child in widget._all:
        if child.name:
            setattr(ui, child.name, child)
    return ui


# --- nodes and files ---------------------------------------------------------------------------------


def exportNode(node, filename, properties=None, world=False):
    import SimpleITK as sitk

    if getattr(node, "image", None) is None:
        return False
    sitk.WriteImage(node.image, str(filename))
    return True


def loadVolume(filename, properties=None, returnNode=False):
    import SimpleITK as sitk

    import slicer

    name = (properties or {}).get("name", Path(filename).name.split(".")[0])
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.image = sitk.ReadImage(str(filename))
    return node


def loadSegmentation(filename, properties=None, returnNode=False):
    """Reads the layered .seg.nrrd with slicerio: segment ids, names, colours, terminology, masks."""
    import slicerio

    import slicer

    data = slicerio.read_segmentation(str(filename))
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", (properties or {}).get("name", "Segmentation"))
    for segment in data.get("segments", []):
        node.segmentation.segments[segment["id"]] = slicer.Segment(
            segment.get("name", segment["id"]), tuple(segment.get("color", (0.5, 0.5, 0.5))),
            {"TerminologyEntry": segment.get("terminology")})
        # slicerio gives (i, j, k); the stand-in keeps SimpleITK's (z, y, x) order everywhere
        node.masks[segment["id"]] = slicerio.segment_mask(data, segment).transpose(2, 1, 0)
    node.fileData = data
    return node


def arrayFromVolume(volumeNode):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(volumeNode.image)


def tempDirectory(key="__SlicerTemp__", tempDir=None, includeDateTime=True):
    base = Path(tempDir or os.environ.get("SLICER_STUB_TEMP", tempfile.gettempdir()))
    path = base / f"{key}-{os.getpid()}-{next(_counter)}"
    path.mkdir(parents=True)
    return str(path)


# --- settings, environment, dialogs, pip ---------------------------------------------------------------


def settingsValue(key, default, converter=lambda v: v, settings=None):
    settings = qt.QSettings() if settings is None else settings
    return converter(settings.value(key)) if settings.contains(key) else default


def startupEnvironment():
    return dict(os.environ)


def mainWindow():
    return None


def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    _log["errorDisplay"].append(str(text))


def infoDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    _log["infoDisplay"].append(str(text))


def warningDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    _log["warningDisplay"].append(str(text))


def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
    _log["confirm"].append((str(text), kwargs.get("detailedText", "")))
    return _answers.pop(0) if _answers else True


def confirmYesNoDisplay(text, windowTitle=None, parent=None, **kwargs):
    return confirmOkCancelDisplay(text, windowTitle, parent, **kwargs)


@contextlib.contextmanager
def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
    try:
        yield
    except Exception as e:
        if show:
            errorDisplay(f"{message}\n\n{e}" if message else str(e))
        raise


def pip_install(requirements):
    _log["pip_install"].append(requirements)


def pip_uninstall(requirements):
    _log["pip_uninstall"].append(requirements)


class VTKObservationMixin:
    """Distinct from ScriptedLoadableModuleWidget, as in Slicer (else the module's MRO would fail)."""

    def __init__(self):
        super().__init__()
        self.Observations: list = []

    def addObserver(self, obj, event, method, group="none", priority=0.0):
        tag = obj.AddObserver(event, method, priority)
        self.Observations.append([obj, event, method, group, tag, priority])

    def removeObserver(self, obj, event, method):
        for o in list(self.Observations):
            if o[0] is obj and o[1] == event and o[2] == method:
                obj.RemoveObserver(o[4])
                self.Observations.remove(o)

    def removeObservers(self, method=None):
        for o in list(self.Observations):
            if method is None or o[2] == method:
                o[0].RemoveObserver(o[4])
                self.Observations.remove(o)
