"""Stand-in for the `slicer` package: exactly the MRML nodes, scene, application and widgets that
UniversalSeg uses (see ../README.md). Volumes hold a SimpleITK image; segmentations hold numpy masks."""

from __future__ import annotations

import itertools

import numpy as np
import qt

_clock = itertools.count(1)  # a modified-time counter, as vtkTimeStamp


class vtkMRMLNode:
    """Mimics Libs/MRML/Core/vtkMRMLNode (names, attributes, node references, observers)."""

    _ids = itertools.count(1)

    def __init__(self):
        self._scene = None
        self._mtime = next(_clock)
        self._id: str | None = None
        self._name = ""
        self._attributes: dict[str, str] = {}
        self._references: dict[str, str] = {}
        self._observers: dict[int, tuple[int, object]] = {}
        self._tags = itertools.count(1)

    def GetClassName(self) -> str:
        return type(self).__name__

    def IsA(self, className: str) -> bool:
        return any(c.__name__ == className for c in type(self).__mro__)

    def GetID(self) -> str | None:
        return self._id

    def GetName(self) -> str:
        return self._name

    def SetName(self, name: str) -> None:
        self._name = name

    def SetAttribute(self, name: str, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("MRML attributes are strings")
        self._attributes[name] = value

    def GetAttribute(self, name: str) -> str | None:
        return self._attributes.get(name)

    def SetNodeReferenceID(self, role: str, nodeId: str) -> None:
        self._references[role] = nodeId

    def GetNodeReferenceID(self, role: str) -> str | None:
        return self._references.get(role)

    def AddObserver(self, event: int, callback, priority: float = 0.0) -> int:
        tag = next(self._tags)
        self._observers[tag] = (event, callback)
        return tag

    def RemoveObserver(self, tag: int) -> None:
        self._observers.pop(tag, None)

    def Modified(self) -> None:
        self._mtime = next(_clock)
        for event, callback in list(self._observers.values()):
            if event == 33:  # vtkCommand::ModifiedEvent
                callback(self, event)

    def GetScene(self):
        """vtkMRMLNode::GetScene: None once the node was removed from its scene."""
        return self._scene


class vtkMRMLTransformableNode(vtkMRMLNode):
    """Libs/MRML/Core/vtkMRMLTransformableNode: the parent transform is a node reference."""

    def SetAndObserveTransformNodeID(self, transformNodeId: str | None) -> bool:
        if transformNodeId:
            self._references["transform"] = transformNodeId
        else:
            self._references.pop("transform", None)
        return True

    def GetTransformNodeID(self) -> str | None:
        return self._references.get("transform")


class vtkMRMLLinearTransformNode(vtkMRMLTransformableNode):
    """Mimics Libs/MRML/Core/vtkMRMLLinearTransformNode."""


class vtkMRMLStorageNode(vtkMRMLNode):
    """Libs/MRML/Core/vtkMRMLStorageNode: the file a storable node is saved to and read from."""

    def __init__(self):
        super().__init__()
        self._fileName = ""

    def SetFileName(self, fileName: str) -> None:
        self._fileName = str(fileName)

    def GetFileName(self) -> str:
        return self._fileName


class vtkMRMLSegmentationStorageNode(vtkMRMLStorageNode):
    """Mimics Libs/MRML/Core/vtkMRMLSegmentationStorageNode."""


class vtkMRMLVolumeArchetypeStorageNode(vtkMRMLStorageNode):
    """Mimics Libs/MRML/Core/vtkMRMLVolumeArchetypeStorageNode."""


class vtkMRMLStorableNode(vtkMRMLTransformableNode):
    """Libs/MRML/Core/vtkMRMLStorableNode: GetStorageNode follows the storage node reference, and
    GetModifiedSinceRead is true once the node changed after it was read (or when it was never read).
    Slicer's Save dialog (qSlicerSaveDataDialog) pre-selects only nodes modified since read."""

    _storedTime: int | None = None

    def GetStorageNode(self):
        nodeId = self._references.get("storage")
        return self._scene.GetNodeByID(nodeId) if self._scene is not None and nodeId else None

    def SetAndObserveStorageNodeID(self, nodeId: str | None) -> None:
        self._references["storage"] = nodeId

    def StorableModified(self) -> None:
        """Called by the data (segments, image) on every change: vtkMRMLStorableNode::StorableModified."""
        self.Modified()

    def markRead(self) -> None:
        """Stand-in helper: the storage node has just read this node (vtkMRMLStorageNode::ReadData)."""
        self._storedTime = self._mtime

    def GetModifiedSinceRead(self) -> bool:
        return self._storedTime is None or self._mtime > self._storedTime


class vtkMRMLScriptedModuleNode(vtkMRMLNode):
    """Mimics Libs/MRML/Core/vtkMRMLScriptedModuleNode (the parameter node)."""

    def __init__(self):
        super().__init__()
        self.values: dict = {}


class vtkMRMLScalarVolumeNode(vtkMRMLStorableNode):
    """Mimics Libs/MRML/Core/vtkMRMLScalarVolumeNode (the stand-in's voxels: a SimpleITK image)."""

    def __init__(self):
        super().__init__()
        self.image = None  # SimpleITK.Image


class vtkMRMLLabelMapVolumeNode(vtkMRMLScalarVolumeNode):
    """Mimics Libs/MRML/Core/vtkMRMLLabelMapVolumeNode."""


class vtkSegment:
    """Libs/vtkSegmentationCore/vtkSegment: name, colour and string tags. `GetTag(tag, value)` is the
    real signature: it fills a `vtk.reference` and returns whether the tag exists."""

    def __init__(self, name: str = "", color=(0.5, 0.5, 0.5), tags: dict | None = None):
        self._name = name
        self._color = tuple(color)
        self._tags: dict[str, str] = {}
        for key, value in (tags or {}).items():
            self.SetTag(key, value)

    @staticmethod
    def GetTerminologyEntryTagName() -> str:
        return "TerminologyEntry"

    def GetName(self) -> str:
        return self._name

    def SetName(self, name: str) -> None:
        self._name = str(name)

    def GetColor(self):
        return self._color

    def SetColor(self, color) -> None:
        self._color = tuple(color)

    def SetTag(self, tag: str, value) -> None:
        if not isinstance(value, (str, int)):
            raise TypeError("vtkSegment::SetTag takes a string or an int")
        self._tags[tag] = str(value)

    def GetTag(self, tag: str, value) -> bool:
        if not hasattr(value, "set"):
            raise TypeError("vtkSegment::GetTag(tag, value) fills a vtk.reference('')")
        if tag not in self._tags:
            return False
        value.set(self._tags[tag])
        return True


Segment = vtkSegment  # the stand-in's older name


class vtkSegmentation:
    """Libs/vtkSegmentationCore/vtkSegmentation: segments in order, each a binary mask (z, y, x) on a grid
    given by a SimpleITK image (the stand-in's form of the labelmap representation and its geometry)."""

    EXTENT_REFERENCE_GEOMETRY, EXTENT_UNION_OF_SEGMENTS, EXTENT_UNION_OF_SEGMENTS_PADDED, \
        EXTENT_UNION_OF_EFFECTIVE_SEGMENTS, EXTENT_UNION_OF_EFFECTIVE_SEGMENTS_PADDED = range(5)

    def __init__(self, owner=None):
        self.segments: dict[str, vtkSegment] = {}
        self.masks: dict[str, np.ndarray] = {}
        self.grids: dict[str, object] = {}  # segment id -> SimpleITK image of its mask's grid
        self._owner = owner

    def _changed(self) -> None:
        if self._owner is not None:
            self._owner.StorableModified()

    def GetNumberOfSegments(self) -> int:
        return len(self.segments)

    def GetNthSegmentID(self, index: int) -> str:
        return list(self.segments)[index]

    def GetSegment(self, segmentId: str) -> vtkSegment | None:
        return self.segments.get(segmentId)

    def GetSegmentIDs(self) -> list[str]:
        return list(self.segments)

    def RemoveSegment(self, segmentId: str) -> None:
        self.segments.pop(segmentId, None)
        self.masks.pop(segmentId, None)
        self.grids.pop(segmentId, None)
        self._changed()

    def RemoveAllSegments(self) -> None:
        for segmentId in list(self.segments):
            self.RemoveSegment(segmentId)

    def CopySegmentFromSegmentation(self, fromSegmentation: vtkSegmentation, segmentId: str,
                                    removeFromSource: bool = False) -> bool:
        """vtkSegmentation::CopySegmentFromSegmentation: the copy keeps the id unless it is taken."""
        segment = fromSegmentation.segments.get(segmentId)
        if segment is None:
            return False
        newId = segmentId
        while newId in self.segments:
            newId = f"{newId}_1"
        copy = vtkSegment(segment.GetName(), segment.GetColor(), segment._tags)
        self.segments[newId] = copy
        self.masks[newId] = fromSegmentation.masks[segmentId].copy()
        self.grids[newId] = fromSegmentation.grids.get(segmentId)
        if removeFromSource:
            fromSegmentation.RemoveSegment(segmentId)
        self._changed()
        return True

    def DeepCopy(self, other: vtkSegmentation) -> None:
        """vtkSegmentation::DeepCopy: this segmentation's segments become copies of `other`'s."""
        self.segments = {k: vtkSegment(s.GetName(), s.GetColor(), s._tags) for k, s in other.segments.items()}
        self.masks = {k: m.copy() for k, m in other.masks.items()}
        self.grids = dict(other.grids)
        self._changed()

    def CollapseBinaryLabelmaps(self, forceToSingleLayer: bool = False) -> None:
        """Packs layers; the stand-in keeps one mask per segment, so overlaps are kept as in Slicer."""
        self._changed()


class vtkMRMLDisplayNode(vtkMRMLNode):
    """Mimics Libs/MRML/Core/vtkMRMLDisplayNode."""


class vtkMRMLSegmentationDisplayNode(vtkMRMLDisplayNode):
    """Mimics Libs/MRML/Core/vtkMRMLSegmentationDisplayNode."""


class vtkMRMLSegmentationNode(vtkMRMLStorableNode):
    """Mimics Libs/MRML/Core/vtkMRMLSegmentationNode (a vtkSegmentation, reference geometry, display node)."""

    def __init__(self):
        super().__init__()
        self.segmentation = vtkSegmentation(self)
        self.referenceGeometryVolume = None

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """Stand-in helper: segment id -> (z, y, x) mask."""
        return self.segmentation.masks

    @property
    def image(self):
        """Stand-in helper: the grid of the first segment."""
        return next(iter(self.segmentation.grids.values()), None)

    def GetSegmentation(self) -> vtkSegmentation:
        return self.segmentation

    def GetReferenceImageGeometryReferenceRole(self) -> str:
        return "referenceImageGeometryRef"

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volumeNode) -> None:
        self.referenceGeometryVolume = volumeNode

    def CreateDefaultDisplayNodes(self) -> None:
        if self.GetDisplayNode() is None and self._scene is not None:
            display = self._scene.AddNewNodeByClass("vtkMRMLSegmentationDisplayNode")
            self._references["display"] = display.GetID()

    def GetDisplayNode(self):
        nodeId = self._references.get("display")
        return self._scene.GetNodeByID(nodeId) if self._scene is not None and nodeId else None

    def addSegmentFromMask(self, segmentId: str, name: str, mask: np.ndarray, image) -> None:
        """Test helper (not a Slicer call): a segment drawn on `image`'s grid."""
        self.segmentation.segments[segmentId] = vtkSegment(name)
        self.segmentation.masks[segmentId] = mask.astype(bool)
        self.segmentation.grids[segmentId] = image


NODE_CLASSES = {c.__name__: c for c in (vtkMRMLScriptedModuleNode, vtkMRMLScalarVolumeNode,
                                        vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode,
                                        vtkMRMLSegmentationStorageNode, vtkMRMLVolumeArchetypeStorageNode,
                                        vtkMRMLSegmentationDisplayNode, vtkMRMLLinearTransformNode)}


class vtkMRMLSubjectHierarchyNode:
    """Items: 1 is the scene; every node added to the scene gets an item under it."""

    def __init__(self):
        self._parent: dict[int, int] = {}
        self._node: dict[int, vtkMRMLNode | None] = {}
        self._ids = itertools.count(2)

    @staticmethod
    def GetSubjectHierarchyNode(scene: vtkMRMLScene) -> vtkMRMLSubjectHierarchyNode:
        return scene.subjectHierarchy

    def GetSceneItemID(self) -> int:
        return 1

    def CreateFolderItem(self, parent: int, name: str) -> int:
        item = next(self._ids)
        self._parent[item], self._node[item] = parent, None
        return item

    def _add(self, node: vtkMRMLNode) -> None:
        item = next(self._ids)
        self._parent[item], self._node[item] = 1, node

    def _remove(self, node: vtkMRMLNode) -> None:
        for item, n in list(self._node.items()):
            if n is node:
                del self._node[item], self._parent[item]

    def GetItemByDataNode(self, node: vtkMRMLNode) -> int:
        return next((item for item, n in self._node.items() if n is node), 0)

    def GetItemParent(self, item: int) -> int:
        return self._parent.get(item, 0)

    def SetItemParent(self, item: int, parent: int) -> None:
        if item not in self._parent or (parent != 1 and parent not in self._parent):
            raise ValueError("invalid subject hierarchy item")
        self._parent[item] = parent


class vtkMRMLScene(vtkMRMLNode):
    """Mimics Libs/MRML/Core/vtkMRMLScene (AddNode, AddNewNodeByClass, RemoveNode, singletons, unique names)."""

    StartCloseEvent, EndCloseEvent = 66000, 66001

    def __init__(self):
        super().__init__()
        self.nodes: list[vtkMRMLNode] = []
        self.subjectHierarchy = vtkMRMLSubjectHierarchyNode()
        self._singletons: dict[tuple[str, str], vtkMRMLNode] = {}

    def AddNode(self, node: vtkMRMLNode) -> vtkMRMLNode:
        node._id = f"{type(node).__name__}{next(vtkMRMLNode._ids)}"
        node._scene = self
        self.nodes.append(node)
        if not isinstance(node, (vtkMRMLStorageNode, vtkMRMLDisplayNode)):  # those have no hierarchy item
            self.subjectHierarchy._add(node)
        return node

    def GetNodeByID(self, nodeId: str):
        return next((n for n in self.nodes if n.GetID() == nodeId), None)

    def IsNodePresent(self, node: vtkMRMLNode) -> int:
        """vtkMRMLScene::IsNodePresent: nonzero when the node is in the scene."""
        return self.nodes.index(node) + 1 if node in self.nodes else 0

    def AddNewNodeByClass(self, className: str, name: str = "") -> vtkMRMLNode:
        node = NODE_CLASSES[className]()
        node.SetName(name or className)
        return self.AddNode(node)

    def RemoveNode(self, node: vtkMRMLNode) -> None:
        if node in self.nodes:
            self.nodes.remove(node)
            node._scene = None
            self.subjectHierarchy._remove(node)

    def GetFirstNodeByClass(self, className: str):
        return next((n for n in self.nodes if n.IsA(className)), None)

    def GetNumberOfNodesByClass(self, className: str) -> int:
        return sum(n.IsA(className) for n in self.nodes)

    def GetSingletonNode(self, tag: str, className: str):
        return self._singletons.get((tag, className))

    def setSingleton(self, tag: str, node: vtkMRMLNode) -> None:
        self._singletons[(tag, node.GetClassName())] = node

    def GenerateUniqueName(self, base: str) -> str:
        names = {n.GetName() for n in self.nodes}
        if base not in names:
            return base
        return next(f"{base}_{i}" for i in itertools.count(1) if f"{base}_{i}" not in names)

    def Clear(self, removeSingletons: bool = False) -> None:
        """vtkMRMLScene::Clear (File > Close Scene): StartCloseEvent, the nodes go, EndCloseEvent."""
        self.InvokeEvent(self.StartCloseEvent)
        for node in list(self.nodes):
            self.RemoveNode(node)
        self.InvokeEvent(self.EndCloseEvent)

    def InvokeEvent(self, event: int) -> None:
        for observedEvent, callback in list(self._observers.values()):
            if observedEvent == event:
                callback(self, event)


mrmlScene = vtkMRMLScene()


class _Style:
    """Mimics QApplication::style() (standard icons)."""

    def standardIcon(self, which: int) -> qt.QIcon:
        return qt.QIcon(f"standard:{which}")


class _App:
    """Mimics Base/QTCore/qSlicerCoreApplication and Base/QTGUI/qSlicerApplication (slicer.app)."""

    def __init__(self):
        self.connections: list[tuple[str, object]] = []
        self.testing = False

    @property
    def temporaryPath(self) -> str:
        """qSlicerCoreApplication::temporaryPath (the stand-in: $SLICER_STUB_TEMP)."""
        import os
        import tempfile

        return os.environ.get("SLICER_STUB_TEMP", tempfile.gettempdir())

    def connect(self, signal: str, slot) -> None:
        self.connections.append((signal, slot))

    def processEvents(self) -> None:
        pass

    def testingEnabled(self) -> bool:
        return self.testing

    def setOverrideCursor(self, cursor) -> None:
        pass

    def restoreOverrideCursor(self) -> None:
        pass

    def style(self) -> _Style:
        return _Style()


app = _App()


class qMRMLWidget(qt.QWidget):
    """Mimics Libs/MRML/Widgets/qMRMLWidget (mrmlSceneChanged -> setMRMLScene)."""

    SIGNALS = ("mrmlSceneChanged(vtkMRMLScene*)",)

    def setMRMLScene(self, scene: vtkMRMLScene) -> None:
        self._signals["mrmlSceneChanged"].emit(scene)


class qMRMLNodeComboBox(qt.QWidget):
    """Mimics Libs/MRML/Widgets/qMRMLNodeComboBox (nodeTypes, noneEnabled, currentNode)."""

    SIGNALS = ("currentNodeChanged(vtkMRMLNode*)",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.nodeTypes: list[str] = []
        self.noneEnabled = False
        self.addEnabled = True
        self.removeEnabled = True
        self.showChildNodeTypes = True
        self._scene = None
        self._node = None

    def setMRMLScene(self, scene: vtkMRMLScene) -> None:
        self._scene = scene
        if self._node is None and not self.noneEnabled:
            first = next((n for n in scene.nodes if any(n.IsA(t) for t in self.nodeTypes)), None)
            if first is not None:
                self.setCurrentNode(first)

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node) -> None:
        if node is not self._node:
            self._node = node
            self._signals["currentNodeChanged"].emit(node)


class qMRMLSegmentationShow3DButton(qt.QPushButton):
    """Modules/Loadable/Segmentations/Widgets/qMRMLSegmentationShow3DButton: toggles the closed-surface
    representation (3D view) of the segmentation node it is given."""

    def __init__(self, parent=None):
        super().__init__("Show 3D", parent)
        self._segmentationNode = None

    def setSegmentationNode(self, node) -> None:
        self._segmentationNode = node
        self.setEnabled(node is not None)

    def segmentationNode(self):
        return self._segmentationNode


class _SegmentationsLogic:
    """Mimics Modules/Loadable/Segmentations/Logic/vtkSlicerSegmentationsModuleLogic."""

    def ExportSegmentsToLabelmapNode(self, segmentationNode, segmentIds, labelmapNode, referenceVolumeNode=None,
                                     extentComputationMode=vtkSegmentation.EXTENT_UNION_OF_EFFECTIVE_SEGMENTS) -> bool:
        """vtkSlicerSegmentationsModuleLogic::ExportSegmentsToLabelmapNode: on the reference volume's grid,
        but by default (EXTENT_UNION_OF_EFFECTIVE_SEGMENTS) cropped to the segments' non-empty box."""
        import SimpleITK as sitk

        reference = referenceVolumeNode.image
        labels = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.uint8)
        for i in range(segmentIds.GetNumberOfValues()):
            mask = segmentationNode.masks[segmentIds.GetValue(i)]
            if mask.shape != labels.shape:
                return False
            labels[mask] = i + 1
        image = sitk.GetImageFromArray(labels)
        image.CopyInformation(reference)
        if extentComputationMode != vtkSegmentation.EXTENT_REFERENCE_GEOMETRY and labels.any():
            nonzero = np.argwhere(labels)
            lo, hi = nonzero.min(axis=0), nonzero.max(axis=0) + 1
            image = sitk.RegionOfInterest(image, [int(v) for v in (hi - lo)[::-1]], [int(v) for v in lo[::-1]])
        labelmapNode.image = image
        return True


class _TerminologiesLogic:
    """Modules/Loadable/Terminologies/Logic/vtkSlicerTerminologiesModuleLogic: LoadTerminologyFromFile and
    DeserializeTerminologyEntry, with the checks the C++ makes."""

    def __init__(self):
        self.contexts: dict[str, dict] = {}  # stand-in helper: loaded contexts by name

    def LoadTerminologyFromFile(self, filePath: str) -> str:
        """Returns the context name, or "" when the file cannot be read, is not JSON, lacks "@schema"
        or the context name (as the C++ logs an error and returns "")."""
        import json

        try:
            with open(filePath, encoding="utf-8") as f:
                root = json.load(f)
        except (OSError, ValueError):
            return ""
        name = root.get("SegmentationCategoryTypeContextName") if isinstance(root, dict) else None
        if "@schema" not in root or not name or "SegmentationCodes" not in root:
            return ""
        self.contexts[name] = root
        return name

    def DeserializeTerminologyEntry(self, serializedEntry: str, entry) -> bool:
        """Splits on "~" as vtksys::SystemTools::Split does (a trailing empty field is dropped), needs
        7 fields, a category and a type of three "^"-separated parts."""
        fields = _vtksys_split(serializedEntry, "~")
        if len(fields) != 7 or fields[1] == "^^":
            return False
        triplets = [f.split("^") for f in fields[1:4]] + [fields[5].split("^"), fields[6].split("^")]
        if len(triplets[0]) != 3 or len(triplets[1]) != 3:
            return False
        entry.contextName, entry.regionContextName = fields[0], fields[4]
        entry.category, entry.type = triplets[0], triplets[1]
        entry.typeModifier = triplets[2] if len(triplets[2]) == 3 and any(triplets[2]) else None
        entry.region = triplets[3] if len(triplets[3]) == 3 and any(triplets[3]) else None
        entry.regionModifier = triplets[4] if len(triplets[4]) == 3 and any(triplets[4]) else None
        return True


def _vtksys_split(text: str, separator: str) -> list[str]:
    """vtksys::SystemTools::Split: no field after a trailing separator."""
    parts = text.split(separator)
    return parts[:-1] if parts and parts[-1] == "" and text.endswith(separator) else parts


class vtkSlicerTerminologyEntry:
    """Modules/Loadable/Terminologies/Logic/vtkSlicerTerminologyEntry (fields as plain attributes)."""

    def __init__(self):
        self.contextName = self.regionContextName = ""
        self.category = self.type = self.typeModifier = self.region = self.regionModifier = None


class _Module:
    """Mimics slicer.modules.<name> (qSlicerAbstractCoreModule) with .logic()."""

    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


class _Modules:
    """Mimics slicer.modules: segmentations and terminologies."""

    segmentations = _Module(_SegmentationsLogic())
    terminologies = _Module(_TerminologiesLogic())


modules = _Modules()

from slicer import util as util  # noqa: E402  (real Slicer exposes slicer.util on import)
