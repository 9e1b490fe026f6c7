"""UniversalSeg: universal CT segmentation in 3D Slicer with the CLIP-driven Universal Model.

The module is a thin layer: it exports the volume, runs the bundled backend (`UniversalSegLib`) as a
background process of Slicer's Python, follows its progress lines, and loads the layered `.seg.nrrd`
it writes as one segmentation node. No torch code runs inside Slicer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from UniversalSegModuleLib.backend import (
    PUBLISHED_CHECKPOINT_LICENSE,
    BackendError,
    BackendJob,
    JobCancelled,
    ProgressEvent,
    SegmentStatistics,
    backend_command,
    guess_backbone,
    import_checkpoint_args,
    load_statistics,
    output_path,
    predict_args,
    run_json,
    statistics_output,
)
from UniversalSegModuleLib.classes import (
    GROUP_TITLES,
    display_name,
    group_classes,
    matches,
    selection_summary,
    standard_segment_name,
)
from UniversalSegModuleLib.dependencies import (
    DependencyError,
    DependencyInstaller,
    InstallPlan,
    SlicerDependencyInstaller,
    backend_torch_requirement,
    bundled_backend_dir,
    bundled_backend_version,
    ensure_dependencies,
    full_selftest_requested,
    plan_installation,
    unique_temp_dir,
)
from UniversalSegModuleLib.process import ProcessRunner, SubprocessRunner
from UniversalSegModuleLib.wizard import (
    LossHistory,
    NewClass,
    TrainingCase,
    TrainingSettings,
    extend_args,
    parse_report,
    validate_cases,
    validate_classes,
    validate_settings,
    write_classes_file,
    write_training_folder,
)

SETTINGS_PREFIX = "UniversalSeg/"
GROUP_DATA_PREFIX = "group:"
MODULE_DIR = Path(__file__).resolve().parent
TERMINOLOGY_FILE = MODULE_DIR / "Resources" / "SegmentationCategoryTypeModifier-UniversalSeg.term.json"
TERMINOLOGY_CONTEXT = "UniversalSeg"  # the context name of every segment's terminology entry


#
# UniversalSeg
#


class UniversalSeg(ScriptedLoadableModule):
    """Module metadata; see https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py"""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("UniversalSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # PyTorchUtils (PyTorch extension) is imported only when installing torch
        self.parent.contributors = ["UniversalSeg contributors"]
        self.parent.helpText = _("""
Segments many structures in a CT at once (organs, vessels, tumours, bones) with a CLIP-driven Universal
Model. Every structure becomes its own segment and overlaps are kept (a tumour stays inside its organ).
Choose the structures, press Apply, keep working while it runs. Use <b>Add classes...</b> to teach the
model a new structure from your own segmentations. The first Apply installs PyTorch and the backend
after asking. See the <a href="https://github.com/universalseg/UniversalSeg/blob/main/docs/slicer.md">
documentation</a>.
""")
        self.parent.acknowledgementText = _("""
UniversalSeg implements the CLIP-Driven Universal Model of Liu J. et al., "CLIP-Driven Universal Model for Organ
Segmentation and Tumor Detection", ICCV 2023, and its continual-learning extension (Liu J. et al., Medical Image
Analysis 2024), with ideas from MultiTalent (Ulrich C. et al., MICCAI 2023). The sample CT comes from the test
data of TotalSegmentator (Wasserthal J. et al., Radiology: AI 2023; Apache-2.0). Built on 3D Slicer, PyTorch and
MONAI.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", loadTerminology)


def loadTerminology() -> str:
    """Load our terminology context (every class's category, type and modifier codes, including those in
    neither of Slicer's built-in lists), so the segment editor's terminology selector finds them.
    Returns the context name ("" when Slicer could not load the file)."""
    if not hasattr(slicer.modules, "terminologies") or not TERMINOLOGY_FILE.is_file():
        return ""
    name = slicer.modules.terminologies.logic().LoadTerminologyFromFile(str(TERMINOLOGY_FILE))
    if name != TERMINOLOGY_CONTEXT:
        logging.warning(f"UniversalSeg: could not load the terminology {TERMINOLOGY_FILE}")
    return name


def _short(reason: str, limit: int = 90) -> str:
    """A refusal reason short enough for a list entry (the tooltip has all of it)."""
    return reason if len(reason) <= limit else reason[:limit - 3] + "..."


def sampleCtPath() -> Path | None:
    """The abdomen CT shipped with the backend (TotalSegmentator test data, Apache-2.0)."""
    backend = bundled_backend_dir(MODULE_DIR)
    path = backend / "UniversalSegLib" / "resources" / "sample" / "ct_abdomen.nii.gz" if backend else None
    return path if path is not None and path.is_file() else None


def registerSampleData() -> None:
    """Offer the bundled sample CT in the Sample Data module (a local file: no download)."""
    path = sampleCtPath()
    if path is None:
        return
    try:
        import SampleData
    except ImportError:
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="UniversalSeg", sampleName="UniversalSegAbdomenCT",
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "UniversalSeg.png"),
        uris=path.as_uri(), fileNames="ct_abdomen.nii.gz", nodeNames="AbdomenCT")


#
# UniversalSegParameterNode
#


@parameterNodeWrapper
class UniversalSegParameterNode:
    """Scene-saved choices. Volume, output, options are bound to the GUI by connectGui; model and classes
    are synced by hand (there is no GUI connector for a checkable class tree)."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode  # None: a new node each run; else that node is updated
    fast: bool = False
    useStandardSegmentNames: bool = False  # names from the terminology codes instead of the registry's
    model: str = ""
    classes: list[str]


#
# UniversalSegWidget
#


class UniversalSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel; all work is done by UniversalSegLogic."""

    DEVICES = (("auto", "Auto (GPU if available)"), ("cuda", "GPU (CUDA)"), ("cpu", "CPU"))

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: UniversalSegLogic | None = None
        self._parameterNode: UniversalSegParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._models: list[dict[str, Any]] = []
        self._classes: list[dict[str, Any]] = []
        self._groupItems: dict[str, Any] = {}
        self._classItems: dict[str, Any] = {}
        self._updatingTree = False
        self._run: SegmentationRun | None = None
        self._timer = None
        self._wizard = None

    # --- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UniversalSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = UniversalSegLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onPollTimer)

        for device, title in self.DEVICES:
            self.ui.deviceSelector.addItem(title, device)
        self.ui.deviceSelector.setCurrentIndex(self._deviceIndex(self.logic.preferredDevice()))
        self.ui.modelsFolderSelector.setCurrentPath(str(self.logic.modelsFolder()))
        self.ui.resultsTable.setHorizontalHeaderLabels(["Segment", "Volume (ml)", "Mean HU", "Confidence", "Note"])
        self.ui.progressBar.setVisible(False)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                   self.ui.segmentationShow3DButton.setSegmentationNode)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.addClassesButton.connect("clicked(bool)", self.onAddClassesButton)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModelButton)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.onRefreshModelsButton)
        self.ui.updateBackendButton.connect("clicked(bool)", self.onUpdateBackendButton)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.classSearchBox.connect("textChanged(QString)", self.onSearchChanged)
        self.ui.selectAllButton.connect("clicked(bool)", lambda: self.setAllClassesChecked(True))
        self.ui.selectNoneButton.connect("clicked(bool)", lambda: self.setAllClassesChecked(False))
        self.ui.classTree.connect("itemChanged(QTreeWidgetItem*,int)", self.onClassItemChanged)
        self.ui.deviceSelector.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.modelsFolderSelector.connect("currentPathChanged(QString)", self.onModelsFolderChanged)

        self.initializeParameterNode()
        self.updateBackendInfo()
        if self.logic.backendInstalled():
            self.refreshModels(showErrors=False)

    def cleanup(self) -> None:
        if self._run is not None:
            self._run.cancel()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)

    def onSceneStartClose(self, caller, event) -> None:
        # A run's result belongs to the scene being closed: stop it rather than load it into the next one.
        if self._run is not None:
            self.addLog(_("The scene is closing: the running segmentation is cancelled."))
            self.onCancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode: UniversalSegParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)
        self.updateApplyButton()

    # --- state of the buttons ---------------------------------------------------------------------

    def updateApplyButton(self, caller=None, event=None) -> None:
        if self._run is not None:
            self.ui.applyButton.setText(_("Cancel"))
            self.ui.applyButton.setToolTip(_("Stop the segmentation; nothing is added to the scene"))
            self.ui.applyButton.setEnabled(True)
            return
        self.ui.applyButton.setText(_("Apply"))
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        if not volume:
            self.ui.applyButton.setToolTip(_("Select an input volume"))
            self.ui.applyButton.setEnabled(False)
        elif self._models and not self.selectedClasses():
            self.ui.applyButton.setToolTip(_("Select at least one structure"))
            self.ui.applyButton.setEnabled(False)
        else:
            self.ui.applyButton.setToolTip(_("Segment the selected structures"))
            self.ui.applyButton.setEnabled(True)

    def setRunning(self, running: bool) -> None:
        for widget in (self.ui.inputVolumeSelector, self.ui.outputSegmentationSelector, self.ui.modelSelector,
                       self.ui.classTree,
                       self.ui.addClassesButton, self.ui.importModelButton, self.ui.updateBackendButton):
            widget.setEnabled(not running)
        self.ui.progressBar.setVisible(running)
        if running:
            self.ui.progressBar.setValue(0)
        self.updateApplyButton()

    def addLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        logging.info(text)

    # --- models and classes -------------------------------------------------------------------

    def updateBackendInfo(self) -> None:
        self.ui.backendInfoLabel.setText(self.logic.backendStatus())

    def refreshModels(self, showErrors: bool = True) -> None:
        """Reload the model list from the backend and select the remembered model."""
        try:
            self._models = self.logic.listModels(refresh=True)
        except (BackendError, DependencyError) as e:
            self._models = []
            self.ui.modelInfoLabel.setText(_("Models could not be listed: {error}").format(error=e))
            if showErrors:
                slicer.util.errorDisplay(str(e))
            return
        wanted = (self._parameterNode.model if self._parameterNode else "") or self.logic.preferredModel()
        selector = self.ui.modelSelector
        selector.blockSignals(True)
        selector.clear()
        usable = []
        for m in self._models:
            if m.get("refused"):  # failed the backend's checks (tampered, old, unsafe): listed, greyed out
                selector.addItem(_("{name} (refused: {reason})").format(name=m["name"], reason=_short(m["refused"])),
                                 None)
                index = selector.count - 1
                selector.setItemData(index, 0, qt.Qt.UserRole - 1)  # the item's flags (QStandardItemModel): disabled
                selector.setItemData(index, m["refused"], qt.Qt.ToolTipRole)
            else:
                selector.addItem(f"{m['name']} (v{m['version']})", m["name"])
                usable.append(m["name"])
        index = selector.findData(wanted if wanted in usable else (usable[0] if usable else ""))
        selector.setCurrentIndex(index)
        selector.blockSignals(False)
        self.onModelChanged()

    def currentModel(self) -> str | None:
        index = self.ui.modelSelector.currentIndex
        return self.ui.modelSelector.itemData(index) if index >= 0 else None

    def onModelChanged(self, index: int | None = None) -> None:
        name = self.currentModel()
        model = next((m for m in self._models if m["name"] == name), None)
        if model is None:
            refused = sum(1 for m in self._models if m.get("refused"))
            self.ui.modelInfoLabel.setText(_("No usable model: {count} refused (the list says why)").format(
                count=refused) if refused else _("No model"))
            self.populateClassTree([])
            return
        self.ui.modelInfoLabel.setText(_("{classes} classes, {backbone} backbone. License: {license}").format(
            classes=model.get("classes", "?"), backbone=model.get("backbone", "?"),
            license=model.get("license", "unknown")))
        self.logic.setPreferredModel(name)
        if self._parameterNode:
            self._parameterNode.model = name
        try:
            classes = self.logic.listClasses(name)
        except BackendError as e:
            self.addLog(str(e))
            classes = []
        self.populateClassTree(classes)

    def populateClassTree(self, classes: list[dict[str, Any]]) -> None:
        """Fill the tree: one checkable item per group, one per class; restore the saved selection."""
        self._classes = list(classes)
        keys = {c["key"] for c in self._classes}
        saved = [k for k in (self._parameterNode.classes if self._parameterNode else []) if k in keys]
        checked = set(saved) if saved else keys
        self._updatingTree = True
        self.ui.classTree.clear()
        self._groupItems, self._classItems = {}, {}
        for group, members in group_classes(self._classes):
            groupItem = qt.QTreeWidgetItem()
            groupItem.setText(0, GROUP_TITLES[group])
            groupItem.setData(0, qt.Qt.UserRole, GROUP_DATA_PREFIX + group)
            groupItem.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsUserCheckable)
            self.ui.classTree.addTopLevelItem(groupItem)
            self._groupItems[group] = groupItem
            for c in members:
                item = qt.QTreeWidgetItem(groupItem)
                item.setText(0, display_name(c))
                item.setToolTip(0, f"{c['key']}" + (f" (inside {', '.join(c['parents'])})" if c.get("parents") else ""))
                item.setData(0, qt.Qt.UserRole, c["key"])
                item.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(0, qt.Qt.Checked if c["key"] in checked else qt.Qt.Unchecked)
                self._classItems[c["key"]] = item
        self._updatingTree = False
        self.updateGroupStates()
        self.onSearchChanged(self.ui.classSearchBox.text)
        self.onSelectionChanged()

    def selectedClasses(self) -> list[str]:
        return [c["key"] for c in self._classes
                if self._classItems[c["key"]].checkState(0) == qt.Qt.Checked]

    def updateGroupStates(self) -> None:
        self._updatingTree = True
        for groupItem in self._groupItems.values():
            states = {groupItem.child(i).checkState(0) for i in range(groupItem.childCount())}
            state = states.pop() if len(states) == 1 else qt.Qt.PartiallyChecked
            groupItem.setCheckState(0, state)
        self._updatingTree = False

    def onClassItemChanged(self, item, column: int) -> None:
        if self._updatingTree:
            return
        data = str(item.data(0, qt.Qt.UserRole) or "")
        if data.startswith(GROUP_DATA_PREFIX) and item.checkState(0) != qt.Qt.PartiallyChecked:
            # a group's box sets the (visible) classes of the group; compare by data, not wrapper identity
            groupItem = self._groupItems[data[len(GROUP_DATA_PREFIX):]]
            self._updatingTree = True
            for i in range(groupItem.childCount()):
                if not groupItem.child(i).isHidden():
                    groupItem.child(i).setCheckState(0, item.checkState(0))
            self._updatingTree = False
        self.updateGroupStates()
        self.onSelectionChanged()

    def setAllClassesChecked(self, checked: bool) -> None:
        """Select all / none: acts on the classes the search box shows."""
        self._updatingTree = True
        for item in self._classItems.values():
            if not item.isHidden():
                item.setCheckState(0, qt.Qt.Checked if checked else qt.Qt.Unchecked)
        self._updatingTree = False
        self.updateGroupStates()
        self.onSelectionChanged()

    def onSearchChanged(self, text: str) -> None:
        for c in self._classes:
            self._classItems[c["key"]].setHidden(not matches(c, text))
        for groupItem in self._groupItems.values():
            visible = any(not groupItem.child(i).isHidden() for i in range(groupItem.childCount()))
            groupItem.setHidden(not visible)
            groupItem.setExpanded(bool(text) and visible)

    def onSelectionChanged(self) -> None:
        selected = self.selectedClasses()
        self.ui.selectionLabel.setText(selection_summary(selected, len(self._classes)))
        if self._parameterNode:
            self._parameterNode.classes = selected
        self.updateApplyButton()

    def _deviceIndex(self, device: str) -> int:
        return next((i for i, (d, _title) in enumerate(self.DEVICES) if d == device), 0)

    def currentDevice(self) -> str:
        return self.ui.deviceSelector.itemData(self.ui.deviceSelector.currentIndex) or "auto"

    def onDeviceChanged(self, index: int) -> None:
        self.logic.setPreferredDevice(self.currentDevice())

    def onModelsFolderChanged(self, path: str) -> None:
        self.logic.setModelsFolder(path)
        if self.logic.backendInstalled():
            self.refreshModels(showErrors=False)

    # --- running ------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self._run is not None:
            self.onCancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Segmentation could not start."), waitCursor=True):
            volume = self._parameterNode.inputVolume
            if not volume:
                raise ValueError(_("Select an input volume."))
            self.logic.setupPythonRequirements(askConfirmation=True)
            self.updateBackendInfo()
            if not self._models:
                self.refreshModels()
            classes = self.selectedClasses()
            if not classes:
                raise ValueError(_("Select at least one structure."))
            self.ui.logTextEdit.clear()
            self.ui.resultsTable.setRowCount(0)
            self._run = self.logic.startSegmentation(
                volume, classes=None if len(classes) == len(self._classes) else classes, device=self.currentDevice(),
                model=self.currentModel(), fast=self._parameterNode.fast, progressCallback=self.onProgress,
                logCallback=self.addLog, outputSegmentation=self._parameterNode.outputSegmentation,
                standardNames=self._parameterNode.useStandardSegmentNames)
            self.setRunning(True)
            self._timer.start()

    def onProgress(self, event: ProgressEvent) -> None:
        if event.fraction is not None:
            self.ui.progressBar.setValue(int(round(100 * event.fraction)))
        if event.message:
            self.ui.progressBar.setFormat(f"%p%  {event.message}")
            self.addLog(event.message)

    def onPollTimer(self) -> None:
        run = self._run
        if run is None:
            self._timer.stop()
            return
        try:
            finished = run.step()
        except Exception as e:  # never leave the panel stuck in "running"
            logging.exception("UniversalSeg: unexpected error")
            run.error, finished = str(e), True
        if not finished:
            return
        self._timer.stop()
        self._run = None
        self.setRunning(False)
        if run.segmentationNode is not None:
            self.addLog(_("Done: {count} segments in {name}.").format(
                count=len(run.statistics), name=run.segmentationNode.GetName()))
            if self._parameterNode:  # the next run updates this node unless "Create new" is chosen
                self._parameterNode.outputSegmentation = run.segmentationNode
            self.showStatistics(run.statistics)
        elif run.cancelled:
            self.addLog(_("Cancelled; nothing was added to the scene."))
        else:
            self.addLog(_("Failed: {error}").format(error=run.error))
            slicer.util.errorDisplay(_("Segmentation failed: {error}").format(error=run.error))

    def onCancel(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self.onPollTimer()

    def showStatistics(self, statistics: Sequence[SegmentStatistics]) -> None:
        table = self.ui.resultsTable
        table.setRowCount(len(statistics))
        warningIcon = slicer.app.style().standardIcon(qt.QStyle.SP_MessageBoxWarning)
        for row, s in enumerate(statistics):
            values = [s.name, f"{s.volume_ml:.1f}", "" if s.mean_hu is None else f"{s.mean_hu:.0f}",
                      "" if s.mean_confidence is None else f"{s.mean_confidence:.2f}"]
            for column, value in enumerate(values):
                table.setItem(row, column, qt.QTableWidgetItem(value))
            warnings = s.warnings()
            note = qt.QTableWidgetItem("; ".join(warnings))
            if warnings:
                note.setIcon(warningIcon)
                note.setToolTip("\n".join(warnings))
            table.setItem(row, 4, note)
        table.resizeColumnsToContents()

    # --- other actions --------------------------------------------------------------------------

    def onRefreshModelsButton(self) -> None:
        self.logic.clearCaches()
        self.refreshModels()

    def onUpdateBackendButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The backend could not be installed."), waitCursor=True):
            self.logic.setupPythonRequirements(askConfirmation=True, upgrade=True)
            self.updateBackendInfo()
            self.refreshModels()

    def onImportModelButton(self) -> None:
        """File, backbone, name, then the checkpoint's licence: Cancel at any step imports nothing."""
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Import a Universal Model checkpoint"), "",
                                              _("PyTorch checkpoints (*.pth *.pt *.ckpt);;All files (*)"))
        if not path:
            return
        backbone = self.askBackbone(path)
        if not backbone:
            return
        name = qt.QInputDialog.getText(slicer.util.mainWindow(), _("Import model"), _("Name of the imported model:"),
                                       qt.QLineEdit.Normal, f"universal-{backbone}")
        if not name:
            return
        if not slicer.util.confirmOkCancelDisplay(
                _("The published Universal Model checkpoints are licensed {license}. Import {file} for your own "
                  "non-commercial use only, and do not share the imported model.").format(
                    license=PUBLISHED_CHECKPOINT_LICENSE, file=Path(path).name),
                _("UniversalSeg - checkpoint licence"),
                detailedText=_("Creative Commons Attribution-NonCommercial-NoDerivatives 4.0 International: "
                               "https://creativecommons.org/licenses/by-nc-nd/4.0/")):
            return
        with slicer.util.tryWithErrorDisplay(_("The checkpoint could not be imported."), waitCursor=True):
            self.logic.setupPythonRequirements(askConfirmation=True)
            imported = self.logic.importModel(path, backbone=backbone, name=name, logCallback=self.addLog,
                                              idle=slicer.app.processEvents)
            self.logic.setPreferredModel(imported)
            if self._parameterNode:
                self._parameterNode.model = imported
            self.refreshModels()
            slicer.util.infoDisplay(_("Imported {name}. Mind its license, shown under the model selector.").format(
                name=imported))

    def askBackbone(self, path: str) -> str | None:
        """The backbone of a checkpoint (guessed from its file name), or None on Cancel. A dialog object is
        used because PythonQt's static QInputDialog.getItem returns the current item on Cancel."""
        backbones = ["unet", "swinunetr"]
        dialog = qt.QInputDialog(slicer.util.mainWindow())
        dialog.setWindowTitle(_("Import model"))
        dialog.setLabelText(_("Backbone of this checkpoint:"))
        dialog.setComboBoxItems(backbones)
        dialog.setComboBoxEditable(False)
        dialog.setTextValue(guess_backbone(path) or backbones[0])
        if dialog.exec_() != qt.QDialog.Accepted:
            return None
        return dialog.textValue() or None

    def onAddClassesButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The add-classes wizard could not start."), waitCursor=True):
            self.logic.setupPythonRequirements(askConfirmation=True)
            if not self._models:
                self.refreshModels()
        from UniversalSegModuleLib.wizard_dialog import AddClassesWizard

        usable = [m for m in self._models if not m.get("refused")]
        self._wizard = AddClassesWizard(self.logic, baseModel=self.currentModel(), models=usable,
                                        device=self.currentDevice(), parent=slicer.util.mainWindow(),
                                        finishedCallback=self.onWizardFinished)
        self._wizard.show()

    def onWizardFinished(self, wizard) -> None:
        self._wizard = None
        if wizard.createdModel:
            self.logic.setPreferredModel(wizard.createdModel)
            if self._parameterNode:
                self._parameterNode.model = wizard.createdModel
        self.logic.clearCaches()
        self.refreshModels()


#
# UniversalSegLogic
#


class _Run:
    """A backend job plus the temporary folder that only lives as long as the job."""

    def __init__(self, job: BackendJob, tempDir: Path, completedCallback: Callable[[Any], None] | None = None):
        self.job = job
        self.tempDir = tempDir
        self.completedCallback = completedCallback
        self.finished = False
        self.cancelled = False
        self.error: str | None = None

    @property
    def progress(self) -> float:
        return self.job.progress

    def step(self) -> bool:
        """Advance (non-blocking); True once finished. Results are loaded on the caller's thread."""
        if self.finished:
            return True
        if not self.job.step():
            return False
        try:
            if self.job.state == BackendJob.DONE:
                self._collect(self.job.result)
            else:
                self.error = self.job.error
                self._discard()
        except Exception as e:
            self.error = str(e)
            self._discard()
        finally:
            shutil.rmtree(self.tempDir, ignore_errors=True)
        self._finish()
        return True

    def cancel(self) -> None:
        """Kill the backend's whole process tree; nothing is added to the scene, no files remain."""
        if self.finished:
            return
        self.job.cancel()
        self.cancelled = True
        self.error = "cancelled"
        shutil.rmtree(self.tempDir, ignore_errors=True)
        self._discard()
        self._finish()

    def _finish(self) -> None:
        self.finished = True
        if self.completedCallback:
            self.completedCallback(self)

    def wait(self, idle: Callable[[], None] | None = None, pollInterval: float = 0.1) -> None:
        """Block until finished (calling `idle`, e.g. slicer.app.processEvents); raise on failure."""
        import time

        while not self.step():
            if idle:
                idle()
            time.sleep(pollInterval)
        if self.cancelled:
            raise JobCancelled("cancelled")
        if self.error:
            raise BackendError(self.error)

    def _collect(self, result: dict[str, Any]) -> None:
        raise NotImplementedError

    def _discard(self) -> None:
        """Remove anything partially created (called on failure and cancel)."""


class SegmentationRun(_Run):
    """One segmentation in progress; `segmentationNode` is set once the result is in the scene."""

    def __init__(self, logic: UniversalSegLogic, job: BackendJob, tempDir: Path, volumeNode, model: str | None,
                 completedCallback=None, outputSegmentation=None, standardNames: bool = False):
        super().__init__(job, tempDir, completedCallback)
        self.logic = logic
        self.volumeNode = volumeNode
        self.model = model
        self.outputSegmentation = outputSegmentation
        self.standardNames = standardNames
        self.segmentationNode = None
        self.statistics: list[SegmentStatistics] = []

    def _collect(self, result: dict[str, Any]) -> None:
        self.segmentationNode, self.statistics = self.logic.loadResults(
            result, self.volumeNode, self.model, self.outputSegmentation, self.standardNames)

    def _discard(self) -> None:
        if self.segmentationNode is not None and self.segmentationNode is not self.outputSegmentation:
            slicer.mrmlScene.RemoveNode(self.segmentationNode)
        self.segmentationNode = None


class AddClassesRun(_Run):
    """One `extend` training in progress; `modelPath` and `report` are set when it succeeds."""

    def __init__(self, logic: UniversalSegLogic, job: BackendJob, tempDir: Path, outputDir: Path,
                 completedCallback=None, progressCallback: Callable[[ProgressEvent], None] | None = None):
        super().__init__(job, tempDir, completedCallback)
        self.logic = logic
        self.outputDir = outputDir
        self.progressCallback = progressCallback
        self.lossHistory = LossHistory()
        self.modelPath: Path | None = None
        self.report = None

    def onProgress(self, event: ProgressEvent) -> None:
        self.lossHistory.add(event)
        if self.progressCallback:
            self.progressCallback(event)

    def _collect(self, result: dict[str, Any]) -> None:
        self.modelPath = output_path(result, "model")
        report = result.get("report", (result.get("outputs") or {}).get("report"))
        self.report = parse_report(report if isinstance(report, Mapping) else output_path(result, "report"))
        self.logic.clearCaches()

    def _discard(self) -> None:
        # The name was checked to be new before starting, so anything there now is this run's leftover,
        # including the hidden temporary folder of an interrupted atomic save.
        shutil.rmtree(self.outputDir, ignore_errors=True)
        if self.outputDir.parent.is_dir():
            for leftover in self.outputDir.parent.glob(f".{self.outputDir.name}.*"):
                shutil.rmtree(leftover, ignore_errors=True)


def copySegments(source, target) -> list[str]:
    """Put the segments of node `source` into node `target`, overlaps kept; returns their ids. A segment of
    `target` with the same id (a previous result) is replaced; its other segments are kept."""
    sourceSegmentation, targetSegmentation = source.GetSegmentation(), target.GetSegmentation()
    segmentIds = [sourceSegmentation.GetNthSegmentID(i) for i in range(sourceSegmentation.GetNumberOfSegments())]
    if targetSegmentation.GetNumberOfSegments() == 0:
        targetSegmentation.DeepCopy(sourceSegmentation)  # keeps the shared layers: no copy per segment
        return segmentIds
    for segmentId in segmentIds:
        if targetSegmentation.GetSegment(segmentId) is not None:
            targetSegmentation.RemoveSegment(segmentId)
        targetSegmentation.CopySegmentFromSegmentation(sourceSegmentation, segmentId)
    targetSegmentation.CollapseBinaryLabelmaps(False)  # repack layers, overlaps kept
    return segmentIds


def useStandardNames(segmentationNode, segmentIds: Sequence[str]) -> None:
    """Rename segments after their terminology codes (e.g. "Kidney Left"), as TotalSegmentator's option does."""
    segmentation = segmentationNode.GetSegmentation()
    for segmentId in segmentIds:
        segment = segmentation.GetSegment(segmentId)
        entry = vtk.reference("")
        if segment is not None and segment.GetTag(segment.GetTerminologyEntryTagName(), entry):
            name = standard_segment_name(entry.get())
            if name:
                segment.SetName(name)


def removeWithStorage(node) -> None:
    """Remove a node with its storage and display nodes."""
    if node is None:
        return
    attached = [node.GetStorageNode(), node.GetDisplayNode()]
    slicer.mrmlScene.RemoveNode(node)
    for other in attached:
        if other is not None:
            slicer.mrmlScene.RemoveNode(other)


class UniversalSegLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, usable from the Python console without the GUI:

        import UniversalSeg
        logic = UniversalSeg.UniversalSegLogic()
        seg = logic.segment(volumeNode, classes=["liver", "liver_tumor"], device="auto")

    The process runner and the dependency installer are injectable (tests pass fakes).
    """

    def __init__(self, runner: ProcessRunner | None = None, installer: DependencyInstaller | None = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.runner: ProcessRunner = runner or SubprocessRunner()
        self.installer: DependencyInstaller = installer or SlicerDependencyInstaller()
        self.backendSourceDir = bundled_backend_dir(MODULE_DIR)
        self._dependenciesReady = False
        self.lastStatistics: list[SegmentStatistics] = []
        self._models: list[dict[str, Any]] | None = None
        self._classes: dict[str, list[dict[str, Any]]] = {}

    def getParameterNode(self):
        return UniversalSegParameterNode(super().getParameterNode())

    # --- preferences (qt.QSettings, shared by the panel and the console) --------------------------

    @staticmethod
    def _setting(key: str, default: str) -> str:
        return str(slicer.util.settingsValue(SETTINGS_PREFIX + key, default) or default)

    @staticmethod
    def _setSetting(key: str, value: str) -> None:
        qt.QSettings().setValue(SETTINGS_PREFIX + key, value)

    def preferredDevice(self) -> str:
        return self._setting("Device", "auto")

    def setPreferredDevice(self, device: str) -> None:
        self._setSetting("Device", device)

    def preferredModel(self) -> str:
        return self._setting("Model", "")

    def setPreferredModel(self, name: str) -> None:
        self._setSetting("Model", name)

    def modelsFolder(self) -> Path:
        """Where trained, extended and imported models go (the backend's UNIVERSALSEG_MODELS)."""
        default = os.environ.get("UNIVERSALSEG_MODELS") or str(Path.home() / ".universalseg" / "models")
        return Path(self._setting("ModelsFolder", default)).expanduser()

    def setModelsFolder(self, path: str) -> None:
        self._setSetting("ModelsFolder", path)
        self.clearCaches()

    # --- running the backend ------------------------------------------------------------------------

    @staticmethod
    def pythonExecutable() -> str:
        """Slicer's Python launcher (sets up the environment), else this interpreter."""
        return shutil.which("PythonSlicer") or sys.executable

    def backendEnvironment(self) -> dict[str, str]:
        if shutil.which("PythonSlicer"):
            env = dict(slicer.util.startupEnvironment())  # the launcher adds Slicer's own paths
        else:
            env = dict(os.environ)
        env["UNIVERSALSEG_MODELS"] = str(self.modelsFolder())
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        return env

    def backendCommand(self, *args: str) -> list[str]:
        return backend_command(self.pythonExecutable(), *args)

    def _startJob(self, args: Sequence[str], progressCallback=None, logCallback=None, cleanup=()) -> BackendJob:
        command = self.backendCommand(*args)
        logging.info("UniversalSeg: " + " ".join(command))
        process = self.runner.start(command, env=self.backendEnvironment())
        return BackendJob(process, on_progress=progressCallback, on_log=logCallback or logging.info, cleanup=cleanup)

    # --- dependencies -----------------------------------------------------------------------------

    def backendInstalled(self) -> bool:
        return self.installer.backend_version() is not None

    def backendStatus(self) -> str:
        installed = self.installer.backend_version()
        if self.backendSourceDir is None:
            return _("Backend {installed}; no bundled copy found").format(installed=installed or "not installed")
        bundled = bundled_backend_version(self.backendSourceDir)
        if installed is None:
            return _("Backend {bundled} will be installed on first Apply").format(bundled=bundled)
        plan = plan_installation(self.installer, bundled, backend_torch_requirement(self.backendSourceDir))
        if plan.upgrade_backend:
            return _("Backend {installed} is older than the bundled {bundled}: press Update").format(
                installed=installed, bundled=bundled)
        return _("Backend {installed} installed").format(installed=installed)

    def setupPythonRequirements(self, askConfirmation: bool = True, upgrade: bool = False) -> InstallPlan:
        """Install torch (PyTorch extension) and the bundled backend when missing or stale; asks first."""
        plan = ensure_dependencies(self.installer, self.backendSourceDir, ask=askConfirmation, force_backend=upgrade)
        self._dependenciesReady = True
        if plan.needed:
            self.clearCaches()
        return plan

    def ensureDependencies(self, interactive: bool) -> None:
        """Nothing to do when ready; installs after asking when interactive; raises otherwise."""
        if self._dependenciesReady:
            return
        if interactive:
            self.setupPythonRequirements(askConfirmation=True)
            return
        if self.backendSourceDir is None:
            raise DependencyError("the bundled UniversalSeg backend is missing; reinstall the extension")
        plan = plan_installation(self.installer, bundled_backend_version(self.backendSourceDir),
                                 backend_torch_requirement(self.backendSourceDir))
        if plan.needed:
            raise DependencyError("UniversalSeg's Python packages are missing or outdated: run "
                                  "UniversalSeg.UniversalSegLogic().setupPythonRequirements() once (it asks first)")
        self._dependenciesReady = True

    # --- models and classes -------------------------------------------------------------------------

    def clearCaches(self) -> None:
        self._models = None
        self._classes = {}

    def listModels(self, refresh: bool = False) -> list[dict[str, Any]]:
        """Installed models (user folder, then bundled): name, version, classes, backbone, license, path;
        a model the backend refused has only name, path and "refused" (the reason)."""
        if self._models is None or refresh:
            self.ensureDependencies(interactive=False)
            self._models = list(run_json(self.runner, self.backendCommand("models", "--json"),
                                         env=self.backendEnvironment()))
        return self._models

    def listClasses(self, model: str | None = None, refresh: bool = False) -> list[dict[str, Any]]:
        """A model's classes (the bundled default model when None): key, name, group, color, parents..."""
        key = model or ""
        if key not in self._classes or refresh:
            self.ensureDependencies(interactive=False)
            args = ["classes", "--json"] + (["--model", model] if model else [])
            self._classes[key] = list(run_json(self.runner, self.backendCommand(*args), env=self.backendEnvironment()))
        return self._classes[key]

    def listRegistryClasses(self) -> list[dict[str, Any]]:
        """Every structure the built-in registry knows (names, groups, colours, terminology)."""
        if "--all" not in self._classes:
            self.ensureDependencies(interactive=False)
            self._classes["--all"] = list(run_json(self.runner, self.backendCommand("classes", "--all", "--json"),
                                                   env=self.backendEnvironment()))
        return self._classes["--all"]

    # --- segmentation ---------------------------------------------------------------------------

    def startSegmentation(self, volumeNode, classes: str | Sequence[str] | None = None, device: str = "auto",
                          model: str | None = None, fast: bool = False,
                          progressCallback: Callable[[ProgressEvent], None] | None = None,
                          logCallback: Callable[[str], None] | None = None,
                          completedCallback: Callable[[SegmentationRun], None] | None = None,
                          interactive: bool = False, outputSegmentation=None,
                          standardNames: bool = False) -> SegmentationRun:
        """Start segmenting in the background and return at once; call `run.step()` (e.g. from a
        QTimer) until it returns True, then read `run.segmentationNode`, or `run.cancel()`.

        Args:
            outputSegmentation: a segmentation node to update (its segments are replaced by the result's,
                same ids, others kept); None creates a new node.
            standardNames: name segments from their terminology codes instead of the registry's names.
        """
        if volumeNode is None:
            raise ValueError("no input volume")
        self.ensureDependencies(interactive)
        tempDir = unique_temp_dir("UniversalSeg")
        try:
            inputPath = tempDir / "input.nrrd"
            # Local coordinates: the voxels as stored, not resampled; the result is placed under the
            # volume's transform (loadResults), so it overlays the volume wherever the transform puts it.
            if not slicer.util.exportNode(volumeNode, str(inputPath), world=False):
                raise RuntimeError(f"could not export {volumeNode.GetName()} for the backend")
            args = predict_args(inputPath, tempDir / "output", model=model, classes=classes, device=device, fast=fast)
            job = self._startJob(args, progressCallback, logCallback, cleanup=[tempDir])
        except BaseException:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        return SegmentationRun(self, job, tempDir, volumeNode, model, completedCallback, outputSegmentation,
                               standardNames)

    def segment(self, volumeNode, classes: str | Sequence[str] | None = None, device: str = "auto",
                model: str | None = None, fast: bool = False,
                progressCallback: Callable[[ProgressEvent], None] | None = None,
                logCallback: Callable[[str], None] | None = None, interactive: bool = False,
                outputSegmentation=None, standardNames: bool = False):
        """Segment `volumeNode` and return the segmentation node (one segment per class, overlaps kept).

        classes: class keys, names or synonyms, or one such string (None: all classes of the model).
        outputSegmentation: a node to update instead of creating one. The application stays responsive
        while waiting. Raises BackendError with the backend's message on failure."""
        run = self.startSegmentation(volumeNode, classes, device, model, fast, progressCallback, logCallback,
                                     interactive=interactive, outputSegmentation=outputSegmentation,
                                     standardNames=standardNames)
        run.wait(idle=slicer.app.processEvents)
        self.lastStatistics = run.statistics
        return run.segmentationNode

    def loadResults(self, result: Mapping[str, Any], volumeNode, model: str | None, outputSegmentation=None,
                    standardNames: bool = False):
        """Put the backend's .seg.nrrd into `outputSegmentation` (or a new node next to the volume), plus
        its statistics. The file is read into a scratch node that is removed with its storage node: the
        temporary file is deleted after loading, and a node that still pointed at it would look saved
        ("not modified since read") to the Save dialog and be lost on scene save."""
        if not slicer.mrmlScene.IsNodePresent(volumeNode):
            raise BackendError("the input volume was removed from the scene while segmenting")
        segPath = output_path(result, "seg.nrrd")
        statsPath = statistics_output(result)
        statistics = load_statistics(statsPath) if statsPath else []
        scratchName = slicer.mrmlScene.GenerateUniqueName("UniversalSeg result")
        loaded = slicer.util.loadSegmentation(str(segPath), {"name": scratchName})
        if not loaded:
            raise BackendError(f"Slicer could not load {segPath}")
        created = outputSegmentation is None or not slicer.mrmlScene.IsNodePresent(outputSegmentation)
        target = outputSegmentation
        try:
            if created:
                name = slicer.mrmlScene.GenerateUniqueName(f"{volumeNode.GetName()} UniversalSeg")
                target = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
                target.CreateDefaultDisplayNodes()
            segmentIds = copySegments(loaded, target)
            if standardNames:
                useStandardNames(target, segmentIds)
            target.SetNodeReferenceID(target.GetReferenceImageGeometryReferenceRole(), volumeNode.GetID())
            target.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            target.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
            shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
            shNode.SetItemParent(shNode.GetItemByDataNode(target),
                                 shNode.GetItemParent(shNode.GetItemByDataNode(volumeNode)))
            target.SetAttribute("UniversalSeg.Model", model or "")
            target.SetAttribute("UniversalSeg.Statistics", json.dumps([s.__dict__ for s in statistics]))
        except Exception:
            if created and target is not None:
                slicer.mrmlScene.RemoveNode(target)
            raise
        finally:
            removeWithStorage(loaded)
        return target, statistics

    # --- models: import and extend ---------------------------------------------------------------

    def importModel(self, checkpointPath: str, backbone: str, name: str, logCallback=None,
                    idle: Callable[[], None] | None = None) -> str:
        """Import a published Universal Model checkpoint (issue 7's `import-checkpoint`); returns its name."""
        self.ensureDependencies(interactive=False)
        job = self._startJob(import_checkpoint_args(checkpointPath, backbone, name), logCallback=logCallback)
        job.expect_result = False  # a plain command: success is exit code 0
        job.wait(idle=idle)
        self.clearCaches()
        return name

    def exportTrainingCase(self, volumeNode, segmentationNode, segmentClasses: Mapping[str, str],
                           folder: str | Path) -> TrainingCase:
        """Write a volume and some of its segments (segment id -> new class key) as training files:
        the image and one binary mask per segment on the image's grid."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        image = folder / "image.nrrd"
        if not slicer.util.exportNode(volumeNode, str(image)):
            raise RuntimeError(f"could not export {volumeNode.GetName()}")
        masks = {}
        for segmentId, key in segmentClasses.items():
            labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
            try:
                ids = vtk.vtkStringArray()
                ids.InsertNextValue(segmentId)
                # the volume's whole grid: by default Slicer crops the labelmap to the segment's extent
                if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(
                        segmentationNode, ids, labelmap, volumeNode, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
                    raise RuntimeError(f"could not export segment {segmentId} of {segmentationNode.GetName()}")
                path = folder / f"{key}.nrrd"
                if not slicer.util.exportNode(labelmap, str(path)):
                    raise RuntimeError(f"could not write {path}")
            finally:
                slicer.mrmlScene.RemoveNode(labelmap)
            masks[key] = str(path)
        return TrainingCase(str(image), masks, source=f"{volumeNode.GetName()} / {segmentationNode.GetName()}")

    def checkNewClasses(self, newClasses: Sequence[NewClass], baseModel: str | None) -> list[str]:
        """Every problem with the new classes, one line each, in the backend's words: the wizard's own
        questions (`validate_classes`), then `universalseg classes --new-classes` against the base model
        (keys, groups, parents, colours, locations), which reads the classes file `extend` gets."""
        problems = validate_classes(newClasses)
        if problems or not baseModel:
            return problems
        self.ensureDependencies(interactive=False)
        tempDir = unique_temp_dir("UniversalSegCheck")
        try:
            classesFile = write_classes_file(newClasses, tempDir / "classes.json")
            args = ["classes", "--model", baseModel, "--new-classes", str(classesFile), "--json"]
            return list(run_json(self.runner, self.backendCommand(*args), env=self.backendEnvironment())["problems"])
        finally:
            shutil.rmtree(tempDir, ignore_errors=True)

    def validateAddClasses(self, newClasses: Sequence[NewClass], cases: Sequence[TrainingCase],
                           settings: TrainingSettings) -> list[str]:
        """Every problem that would stop `extend`, one line each."""
        models = [m["name"] for m in self.listModels()]
        return (self.checkNewClasses(newClasses, settings.base_model)
                + validate_cases(cases, [c.key for c in newClasses]) + validate_settings(settings, models))

    def startAddClasses(self, newClasses: Sequence[NewClass], cases: Sequence[TrainingCase],
                        settings: TrainingSettings, tempDir: str | Path | None = None,
                        progressCallback: Callable[[ProgressEvent], None] | None = None,
                        logCallback: Callable[[str], None] | None = None,
                        completedCallback: Callable[[AddClassesRun], None] | None = None) -> AddClassesRun:
        """Validate, lay out the training data and start `universalseg extend` in the background."""
        errors = self.validateAddClasses(newClasses, cases, settings)
        if errors:
            raise ValueError("\n".join(errors))
        tempDir = Path(tempDir or unique_temp_dir("UniversalSegExtend"))
        outputDir = self.modelsFolder() / settings.output_name
        try:
            data = write_training_folder(cases, tempDir / "data")
            classesFile = write_classes_file(newClasses, tempDir / "classes.json")
            job = self._startJob(extend_args(settings, data, classesFile, outputDir), None, logCallback,
                                 cleanup=[tempDir])
        except BaseException:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        run = AddClassesRun(self, job, tempDir, outputDir, completedCallback, progressCallback)
        job.on_progress = run.onProgress
        return run

    def addClasses(self, newClasses: Sequence[NewClass | Mapping[str, Any]], trainingData: Sequence[Any],
                   baseModel: str | None = None, outputName: str | None = None, epochs: int | None = 100,
                   timeBudgetMinutes: float | None = None, train: str = "heads", device: str = "auto",
                   progressCallback=None, logCallback=None):
        """Teach a model new structures (blocking; the wizard does the same step by step).

        newClasses: NewClass or dicts {key, name, prompt, group, parents, color, synonyms, trunk}, each sent
        with its own fields (as the wizard does); trunk (lies only in the trunk) unset: the backend's default.
        trainingData: TrainingCase objects, or (volumeNode, segmentationNode, {segmentId: classKey}) tuples.
        Returns the finished AddClassesRun: .modelPath (the new model folder) and .report (Dice, retention).
        """
        classes = [c if isinstance(c, NewClass) else NewClass.from_dict(c) for c in newClasses]
        baseModel = baseModel or next((m["name"] for m in self.listModels() if not m.get("refused")), "")
        outputName = outputName or f"{baseModel}-plus-{'-'.join(c.key for c in classes)}"
        settings = TrainingSettings(baseModel, outputName, epochs, timeBudgetMinutes, train, device)
        tempDir = unique_temp_dir("UniversalSegExtend")
        try:
            cases = [item if isinstance(item, TrainingCase)
                     else self.exportTrainingCase(item[0], item[1], item[2], tempDir / f"case{i:03d}")
                     for i, item in enumerate(trainingData)]
            run = self.startAddClasses(classes, cases, settings, tempDir, progressCallback, logCallback)
        except BaseException:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        run.wait(idle=slicer.app.processEvents)
        return run


#
# UniversalSegTest
#


class UniversalSegTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (ctest, `Slicer --no-main-window --testing --python-code "..."` or the Reload &
    Test button). By default a smoke test: no network, no torch, no install (the extension build machines
    run it). With UNIVERSALSEG_FULL_SELFTEST=1 it also installs what is missing and segments the bundled
    sample CT end to end with the installed default model."""

    SMOKE_TESTS = ("test_smoke_module_files", "test_smoke_terminology")
    FULL_TESTS = ("test_segment_sample_end_to_end", "test_cancel_leaves_nothing", "test_wizard_validation")

    def runTest(self):
        names = self.SMOKE_TESTS + (self.FULL_TESTS if full_selftest_requested() else ())
        for name in names:
            self.setUp()
            getattr(self, name)()
        if not full_selftest_requested():
            logging.info("UniversalSeg: set UNIVERSALSEG_FULL_SELFTEST=1 to run the end-to-end self-test")

    def setUp(self):
        slicer.mrmlScene.Clear()

    def test_smoke_module_files(self):
        for path in (MODULE_DIR / "Resources" / "UI" / "UniversalSeg.ui", MODULE_DIR / "Resources" / "Icons" /
                     "UniversalSeg.png", TERMINOLOGY_FILE):
            self.assertTrue(path.is_file(), path)
        backend = bundled_backend_dir(MODULE_DIR)
        self.assertIsNotNone(backend, "the bundled backend is missing")
        self.assertTrue(bundled_backend_version(backend))
        self.assertIsNotNone(sampleCtPath(), "the bundled sample CT is missing")
        logic = UniversalSegLogic()
        self.assertIn("Backend", logic.backendStatus())
        self.assertIn("--progress-json", logic.backendCommand(*predict_args("in.nrrd", "out")))

    def test_smoke_terminology(self):
        self.assertEqual(loadTerminology(), TERMINOLOGY_CONTEXT)

    def _sampleVolume(self):
        path = sampleCtPath()
        self.assertIsNotNone(path, "the bundled sample CT is missing")
        return slicer.util.loadVolume(str(path))

    def test_segment_sample_end_to_end(self):
        self.delayDisplay("Segmenting the bundled sample CT")
        logic = UniversalSegLogic()
        logic.setupPythonRequirements(askConfirmation=False)
        models = [m for m in logic.listModels() if not m.get("refused")]
        self.assertTrue(models, "no usable model installed")
        keys = [c["key"] for c in logic.listClasses(models[0]["name"])]
        wanted = [k for k in ("liver", "spleen", "kidney_left", "kidney_right") if k in keys] or keys[:2]
        volume = self._sampleVolume()
        progress = []
        segmentation = logic.segment(volume, classes=wanted, model=models[0]["name"], device="auto",
                                     progressCallback=progress.append)
        self.assertIsNotNone(segmentation)
        segments = segmentation.GetSegmentation()
        ids = [segments.GetNthSegmentID(i) for i in range(segments.GetNumberOfSegments())]
        self.assertEqual(sorted(ids), sorted(wanted))
        self.assertTrue(progress and progress[-1].fraction is not None)
        self.assertEqual(len(logic.lastStatistics), len(wanted))
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        self.assertEqual(shNode.GetItemParent(shNode.GetItemByDataNode(segmentation)),
                         shNode.GetItemParent(shNode.GetItemByDataNode(volume)))
        # Against the sample's reference labels (TotalSegmentator ids: 1 spleen, 2/3 kidneys, 5 liver).
        import numpy as np

        labelsPath = sampleCtPath().parent / "ct_abdomen_labels_totalsegmentator_v2.nii.gz"
        labels = slicer.util.arrayFromVolume(slicer.util.loadLabelVolume(str(labelsPath)))
        for key, value in (("spleen", 1), ("kidney_right", 2), ("kidney_left", 3), ("liver", 5)):
            if key in wanted:
                mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, key, volume) > 0
                truth = labels == value
                dice = 2 * np.logical_and(mask, truth).sum() / max(mask.sum() + truth.sum(), 1)
                self.delayDisplay(f"{key}: Dice {dice:.3f}")
                self.assertGreater(dice, 0.7, key)
        self.delayDisplay("Segmentation passed")

    def test_cancel_leaves_nothing(self):
        import time

        logic = UniversalSegLogic()
        logic.setupPythonRequirements(askConfirmation=False)
        volume = self._sampleVolume()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
        run = logic.startSegmentation(volume, classes=None, device="cpu")
        while not run.step() and run.progress == 0.0:
            slicer.app.processEvents()
            time.sleep(0.05)
        run.cancel()
        self.assertTrue(run.cancelled)
        self.assertFalse(run.tempDir.exists())
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), nodesBefore)

    def test_wizard_validation(self):
        logic = UniversalSegLogic()
        logic.setupPythonRequirements(askConfirmation=False)
        base = logic.listModels()[0]["name"]
        existing = logic.listClasses(base)[0]["key"]
        settings = TrainingSettings(base, base)  # the name is taken
        errors = logic.validateAddClasses([NewClass(existing, "x"), NewClass("bad key!", "Bad")], [], settings)
        self.assertTrue(any("already in model" in e for e in errors))
        self.assertTrue(any("letters, digits" in e for e in errors))
        self.assertTrue(any("training image" in e for e in errors))
        self.assertTrue(any("already exists" in e for e in errors))
