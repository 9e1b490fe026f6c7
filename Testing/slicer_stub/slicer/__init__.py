"""Stand-in for the `slicer` package: exactly the MRML nodes, scene, application and widgets that
UniversalSeg uses (see ../README.md). Volumes hold a SimpleITK image; segmentations hold numpy masks."""

from __future__ import annotations

import itertools

import numpy as np
import qt


class vtkMRMLNode:
    _ids = itertools.count(1)

    def __init__(self):
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
        for event, callback in list(self._observers.values()):
            callback(self, event)


class vtkMRMLScriptedModuleNode(vtkMRMLNode):
    def __init__(self):
        super().__init__()
        self.values: dict = {}


class vtkMRMLTransformableNode(vtkMRMLNode):
    """A node that may lie under a parent transform (e.g. DICOM acquisition geometry regularization)."""

    def __init__(self):
        super().__init__()
        self._transform_id: str | None = None

    def SetAndObserveTransformNodeID(self, transformNodeId: str | None) -> bool:
        self._transform_id = transformNodeId
        return True

    def GetTransformNodeID(self) -> str | None:
        return self._transform_id


class vtkMRMLScalarVolumeNode(vtkMRMLTransformableNode):
    def __init__(self):
        super().__init__()
        self.image = None  # SimpleITK.Image


class vtkMRMLLabelMapVolumeNode(vtkMRMLScalarVolumeNode):
    pass


class Segment:
    def __init__(self, name: str, color=(0.5, 0.5, 0.5), tags: dict | None = None):
        self._name = name
        self._color = color
        self.tags = dict(tags or {})

    def GetName(self) -> str:
        return self._name

    def GetColor(self):
        return self._color

    def GetTag(self, name: str) -> str | None:
        return self.tags.get(name)


class vtkSegmentation:
    def __init__(self):
        self.segments: dict[str, Segment] = {}

    def GetNumberOfSegments(self) -> int:
        return len(self.segments)

    def GetNthSegmentID(self, index: int) -> str:
        return list(self.segments)[index]

    def GetSegment(self, segmentId: str) -> Segment | None:
        return self.segments.get(segmentId)

    def GetSegmentIDs(self) -> list[str]:
        return list(self.segments)


class vtkMRMLSegmentationNode(vtkMRMLTransformableNode):
    def __init__(self):
        super().__init__()
        self.segmentation = vtkSegmentation()
        self.masks: dict[str, np.ndarray] = {}  # (z, y, x) bool on `self.image`'s grid
        self.image = None  # SimpleITK image giving the masks' geometry
        self.referenceGeometryVolume = None

    def GetSegmentation(self) -> vtkSegmentation:
        return self.segmentation

    def GetReferenceImageGeometryReferenceRole(self) -> str:
        return "referenceImageGeometryRef"

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volumeNode) -> None:
        self.referenceGeometryVolume = volumeNode

    def addSegmentFromMask(self, segmentId: str, name: str, mask: np.ndarray, image) -> None:
        """Test helper (not a Slicer call): a segment drawn on `image`'s grid."""
        self.segmentation.segments[segmentId] = Segment(name)
        self.masks[segmentId] = mask.astype(bool)
        self.image = image


NODE_CLASSES = {c.__name__: c for c in (vtkMRMLScriptedModuleNode, vtkMRMLScalarVolumeNode,
                                        vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode)}


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
    StartCloseEvent, EndCloseEvent = 66000, 66001

    def __init__(self):
        super().__init__()
        self.nodes: list[vtkMRMLNode] = []
        self.subjectHierarchy = vtkMRMLSubjectHierarchyNode()
        self._singletons: dict[tuple[str, str], vtkMRMLNode] = {}

    def AddNode(self, node: vtkMRMLNode) -> vtkMRMLNode:
        node._id = f"{type(node).__name__}{next(vtkMRMLNode._ids)}"
        self.nodes.append(node)
        self.subjectHierarchy._add(node)
        return node

    def AddNewNodeByClass(self, className: str, name: str = "") -> vtkMRMLNode:
        node = NODE_CLASSES[className]()
        node.SetName(name or className)
        return self.AddNode(node)

    def RemoveNode(self, node: vtkMRMLNode) -> None:
        if node in self.nodes:
            self.nodes.remove(node)
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
        for node in list(self.nodes):
            self.RemoveNode(node)


mrmlScene = vtkMRMLScene()


class _Style:
    def standardIcon(self, which: int) -> qt.QIcon:
        return qt.QIcon(f"standard:{which}")


class _App:
    def __init__(self):
        self.connections: list[tuple[str, object]] = []

    def connect(self, signal: str, slot) -> None:
        self.connections.append((signal, slot))

    def processEvents(self) -> None:
        pass

    def testingEnabled(self) -> bool:
        return False

    def setOverrideCursor(self, cursor) -> None:
        pass

    def restoreOverrideCursor(self) -> None:
        pass

    def style(self) -> _Style:
        return _Style()


app = _App()


class qMRMLWidget(qt.QWidget):
    SIGNALS = ("mrmlSceneChanged(vtkMRMLScene*)",)

    def setMRMLScene(self, scene: vtkMRMLScene) -> None:
        self._signals["mrmlSceneChanged"].emit(scene)


class qMRMLNodeComboBox(qt.QWidget):
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


class _SegmentationsLogic:
    def ExportSegmentsToLabelmapNode(self, segmentationNode, segmentIds, labelmapNode, referenceVolumeNode) -> bool:
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
        labelmapNode.image = image
        return True


class _Module:
    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


class _Modules:
    segmentations = _Module(_SegmentationsLogic())


modules = _Modules()

from slicer import util as util  # noqa: E402  (real Slicer exposes slicer.util on import)
