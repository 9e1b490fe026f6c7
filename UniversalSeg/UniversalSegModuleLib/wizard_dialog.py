"""The add-classes wizard dialog (Qt). Every decision it takes is in wizard.py and the module's Logic;
this file only lays out the five pages and moves data between widgets and those functions.

Pages: 1 new classes, 2 training data, 3 training settings, 4 run (progress, live loss, Cancel),
5 report (new-class Dice, old-class retention) with "Use this model" / "Discard".
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import ctk
import qt
import slicer
from slicer.i18n import tr as _

from UniversalSegModuleLib.backend import DEVICES, ProgressEvent
from UniversalSegModuleLib.dependencies import unique_temp_dir
from UniversalSegModuleLib.wizard import (
    GROUPS,
    TRAIN_MODES,
    NewClass,
    TrainingCase,
    TrainingSettings,
    cases_from_folder,
    default_trunk_only,
    distinct_color,
    plot_coordinates,
    suggest_key,
    validate_cases,
    validate_settings,
)

CLASS_COLUMNS = ("Name", "Key", "Prompt", "Group", "Parent", "Colour", "Trunk only")
NO_PARENT = "(none)"


class AddClassesWizard:
    """A modeless dialog; `createdModel` holds the new model's name once the user keeps it."""

    PAGES = ("New classes", "Training data", "Training", "Run", "Report")

    def __init__(self, logic, baseModel: str | None, models: list[dict[str, Any]], device: str = "auto",
                 parent=None, finishedCallback=None):
        self.logic = logic
        self.baseModel = baseModel or (models[0]["name"] if models else "")
        self.models = models
        self.device = device
        self.finishedCallback = finishedCallback
        self.createdModel: str | None = None
        self.baseClasses: list[dict[str, Any]] = logic.listClasses(self.baseModel) if self.baseModel else []
        self.sceneCases: list[tuple[Any, Any, dict[str, str]]] = []  # (volume, segmentation, {segmentId: key})
        self.folderCases: list[TrainingCase] = []
        self.run = None
        self.finishedRun = None
        self.timer = qt.QTimer()
        self.timer.setInterval(250)
        self.timer.connect("timeout()", self.onPoll)

        self.dialog = qt.QDialog(parent)
        self.dialog.setWindowTitle(_("UniversalSeg - add classes to {model}").format(model=self.baseModel))
        self.dialog.resize(820, 560)
        layout = qt.QVBoxLayout(self.dialog)
        self.titleLabel = qt.QLabel()
        layout.addWidget(self.titleLabel)
        self.stack = qt.QStackedWidget()
        layout.addWidget(self.stack)
        for build in (self._buildClassesPage, self._buildDataPage, self._buildTrainingPage, self._buildRunPage,
                      self._buildReportPage):
            page = qt.QWidget()
            build(qt.QVBoxLayout(page))
            self.stack.addWidget(page)
        self.errorLabel = qt.QLabel()
        self.errorLabel.setWordWrap(True)
        self.errorLabel.setStyleSheet("color: #b00020")
        layout.addWidget(self.errorLabel)
        buttons = qt.QHBoxLayout()
        self.backButton = qt.QPushButton(_("< Back"))
        self.nextButton = qt.QPushButton(_("Next >"))
        self.closeButton = qt.QPushButton(_("Close"))
        for button in (self.backButton, self.nextButton, self.closeButton):
            buttons.addWidget(button)
        layout.addLayout(buttons)
        self.backButton.connect("clicked(bool)", self.onBack)
        self.nextButton.connect("clicked(bool)", self.onNext)
        self.closeButton.connect("clicked(bool)", self.onClose)
        # The title-bar X and Esc reject the dialog without passing through onClose: finish there too.
        self.dialog.connect("finished(int)", self.onDialogFinished)
        self._finished = False
        self.showPage(0)

    def show(self) -> None:
        self.dialog.show()

    def exec_(self) -> int:
        return self.dialog.exec_()

    # --- page 1: the new classes ----------------------------------------------------------------

    def _buildClassesPage(self, layout) -> None:
        layout.addWidget(qt.QLabel(_("Name each structure to add. The parent is a structure that contains it "
                                     "(e.g. a tumour's organ). The prompt is the text the model reads; it defaults to "
                                     "the name. Check 'trunk only' for a structure never found in an arm or leg: "
                                     "it is then removed there. By default it follows the parents (off without "
                                     "one).")))
        self.classTable = qt.QTableWidget(0, len(CLASS_COLUMNS))
        self.classTable.setHorizontalHeaderLabels(list(CLASS_COLUMNS))
        layout.addWidget(self.classTable)
        row = qt.QHBoxLayout()
        self.addClassButton = qt.QPushButton(_("Add new class"))
        self.knownClassSelector = qt.QComboBox()
        self.knownClassSelector.setToolTip(_("Structures UniversalSeg's registry knows but this model does not"))
        self.addKnownButton = qt.QPushButton(_("Add known structure"))
        self.removeClassButton = qt.QPushButton(_("Remove selected"))
        for widget in (self.addClassButton, self.knownClassSelector, self.addKnownButton, self.removeClassButton):
            row.addWidget(widget)
        layout.addLayout(row)
        self.addClassButton.connect("clicked(bool)", lambda: self.addClassRow(
            NewClass("", "", color=distinct_color(self.classTable.rowCount))))
        self.addKnownButton.connect("clicked(bool)", self.onAddKnownClass)
        self.removeClassButton.connect("clicked(bool)", self.onRemoveClass)
        self._fillKnownClasses()

    def _fillKnownClasses(self) -> None:
        have = {c["key"] for c in self.baseClasses}
        try:
            registry = self.logic.listRegistryClasses()
        except Exception:  # the list is a convenience; the wizard works without it
            registry = []
        self.registryClasses = {c["key"]: c for c in registry if c["key"] not in have}
        for key, c in self.registryClasses.items():
            self.knownClassSelector.addItem(f"{c['name']} ({c['group']})", key)
        self.addKnownButton.setEnabled(bool(self.registryClasses))

    def onAddKnownClass(self) -> None:
        key = self.knownClassSelector.itemData(self.knownClassSelector.currentIndex)
        c = self.registryClasses.get(key)
        if c:
            self.addClassRow(NewClass(c["key"], c["name"], c.get("prompt", ""), c.get("group", "other"),
                                      list(c.get("parents", []))[:1], tuple(c.get("color", distinct_color(0)))))

    def defaultTrunkOnly(self, key: str, parents: list[str]) -> bool:
        """The backend's default for a new class (see `default_trunk_only`)."""
        return default_trunk_only(key, parents, self.baseClasses, self.registryClasses.values())

    def addClassRow(self, new: NewClass) -> None:
        row = self.classTable.rowCount
        self.classTable.insertRow(row)
        name, key, prompt = qt.QLineEdit(new.name), qt.QLineEdit(new.key), qt.QLineEdit(new.prompt)
        prompt.setPlaceholderText(_("same as the name"))
        # The key follows the name until the user edits the key itself.
        name.connect("textEdited(QString)", lambda text, key=key: key.setText(suggest_key(text))
                     if not key.isModified() else None)
        group = qt.QComboBox()
        for g in GROUPS:
            group.addItem(g)
        group.setCurrentIndex(GROUPS.index(new.group) if new.group in GROUPS else len(GROUPS) - 1)
        parent = qt.QComboBox()
        parent.addItem(NO_PARENT, "")
        for c in self.baseClasses:
            parent.addItem(c.get("name", c["key"]), c["key"])
        if new.parents:
            parent.setCurrentIndex(max(parent.findData(new.parents[0]), 0))
        color = ctk.ctkColorPickerButton()
        color.setColor(qt.QColor(*[int(v) for v in new.color]))
        prompt.setToolTip(_("Text the model reads for this class (e.g. 'a computerized tomography of a liver tumor')"))
        color.setToolTip(_("Colour of the new segment"))
        trunk = qt.QCheckBox(_("trunk only"))
        trunk.setToolTip(_("Lies only in the trunk (never in an arm or leg): a part found in a limb is removed. "
                           "Default: as its parent; off without a parent."))
        self._followTrunkDefault(trunk, key, parent, new.trunk)
        for column, widget in enumerate((name, key, prompt, group, parent, color, trunk)):
            self.classTable.setCellWidget(row, column, widget)

    def _followTrunkDefault(self, trunk, key, parent, given: bool | None) -> None:
        """Keep the check box at the backend's default for the row's key and parent until the user clicks it."""
        touched = {"yes": given is not None}

        def follow(*_):
            if not touched["yes"]:
                parentKey = parent.itemData(parent.currentIndex)
                trunk.setChecked(self.defaultTrunkOnly(key.text.strip(), [parentKey] if parentKey else []))

        trunk.setChecked(bool(given))
        follow()
        trunk.connect("clicked(bool)", lambda checked: touched.update(yes=True))
        parent.connect("currentIndexChanged(int)", follow)
        key.connect("textChanged(QString)", follow)

    def onRemoveClass(self) -> None:
        row = self.classTable.currentRow()
        if row >= 0:
            self.classTable.removeRow(row)

    def newClasses(self) -> list[NewClass]:
        classes = []
        for row in range(self.classTable.rowCount):
            cell = [self.classTable.cellWidget(row, c) for c in range(len(CLASS_COLUMNS))]
            parentKey = cell[4].itemData(cell[4].currentIndex)
            color = cell[5].color
            classes.append(NewClass(key=cell[1].text.strip(), name=cell[0].text.strip(), prompt=cell[2].text.strip(),
                                    group=cell[3].currentText, parents=[parentKey] if parentKey else [],
                                    color=(color.red(), color.green(), color.blue()), trunk=bool(cell[6].checked)))
        return classes

    # --- page 2: training data --------------------------------------------------------------------

    def _buildDataPage(self, layout) -> None:
        layout.addWidget(qt.QLabel(_("Pick images with a segment of each new class: from the scene (volume, "
                                     "segmentation, segment) or from a folder (one sub-folder per case with "
                                     "ct.nii.gz or image.nii.gz and masks/<key>.nii.gz).")))
        form = qt.QFormLayout()
        self.volumeSelector = slicer.qMRMLNodeComboBox()
        self.volumeSelector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.volumeSelector.noneEnabled = False
        self.volumeSelector.addEnabled = False
        self.volumeSelector.setMRMLScene(slicer.mrmlScene)
        self.segmentationSelector = slicer.qMRMLNodeComboBox()
        self.segmentationSelector.nodeTypes = ["vtkMRMLSegmentationNode"]
        self.segmentationSelector.noneEnabled = False
        self.segmentationSelector.addEnabled = False
        self.segmentationSelector.setMRMLScene(slicer.mrmlScene)
        self.segmentSelector = qt.QComboBox()
        self.targetClassSelector = qt.QComboBox()
        form.addRow(_("Volume:"), self.volumeSelector)
        form.addRow(_("Segmentation:"), self.segmentationSelector)
        form.addRow(_("Segment:"), self.segmentSelector)
        form.addRow(_("is the new class:"), self.targetClassSelector)
        layout.addLayout(form)
        row = qt.QHBoxLayout()
        self.addPairButton = qt.QPushButton(_("Add this pair"))
        self.addFolderButton = qt.QPushButton(_("Add cases from a folder..."))
        self.removeCaseButton = qt.QPushButton(_("Remove selected"))
        for widget in (self.addPairButton, self.addFolderButton, self.removeCaseButton):
            row.addWidget(widget)
        layout.addLayout(row)
        self.caseTable = qt.QTableWidget(0, 3)
        self.caseTable.setHorizontalHeaderLabels(["Source", "Image", "Classes"])
        layout.addWidget(self.caseTable)
        self.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.onSegmentationChanged()  # the selector may have picked a node when it got the scene
        self.addPairButton.connect("clicked(bool)", self.onAddPair)
        self.addFolderButton.connect("clicked(bool)", self.onAddFolder)
        self.removeCaseButton.connect("clicked(bool)", self.onRemoveCase)

    def onSegmentationChanged(self, node=None) -> None:
        self.segmentSelector.clear()
        node = self.segmentationSelector.currentNode()
        if node is None:
            return
        segmentation = node.GetSegmentation()
        for i in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(i)
            self.segmentSelector.addItem(segmentation.GetSegment(segmentId).GetName(), segmentId)

    def onAddPair(self) -> None:
        volume, segmentation = self.volumeSelector.currentNode(), self.segmentationSelector.currentNode()
        segmentId = self.segmentSelector.itemData(self.segmentSelector.currentIndex)
        key = self.targetClassSelector.currentText
        if not (volume and segmentation and segmentId and key):
            self.errorLabel.setText(_("Choose a volume, a segmentation, a segment and the new class it shows."))
            return
        for existingVolume, existingSegmentation, mapping in self.sceneCases:
            if existingVolume is volume and existingSegmentation is segmentation:
                mapping[segmentId] = key
                break
        else:
            self.sceneCases.append((volume, segmentation, {segmentId: key}))
        self.errorLabel.setText("")
        self.refreshCaseTable()

    def onAddFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(self.dialog, _("Folder of training cases"))
        if not folder:
            return
        found = cases_from_folder(folder, [c.key for c in self.newClasses()])
        if not found:
            self.errorLabel.setText(_("No case in {folder} has an image and a mask named after a new class key."
                                      ).format(folder=folder))
        self.folderCases.extend(found)
        self.refreshCaseTable()

    def onRemoveCase(self) -> None:
        row = self.caseTable.currentRow()
        if 0 <= row < len(self.sceneCases):
            del self.sceneCases[row]
        elif row >= len(self.sceneCases):
            del self.folderCases[row - len(self.sceneCases)]
        self.refreshCaseTable()

    def plannedCases(self) -> list[TrainingCase]:
        """The cases as the backend will see them (scene cases are exported only when training starts)."""
        return [TrainingCase(volume.GetName(), dict(zip(mapping.values(), mapping.keys())),
                             source=f"{volume.GetName()} / {segmentation.GetName()}")
                for volume, segmentation, mapping in self.sceneCases] + self.folderCases

    def refreshCaseTable(self) -> None:
        cases = self.plannedCases()
        self.caseTable.setRowCount(len(cases))
        for row, case in enumerate(cases):
            for column, text in enumerate((case.source, Path(case.image).name, ", ".join(case.masks))):
                self.caseTable.setItem(row, column, qt.QTableWidgetItem(text))

    # --- page 3: training settings ----------------------------------------------------------------

    def _buildTrainingPage(self, layout) -> None:
        form = qt.QFormLayout()
        self.baseModelLabel = qt.QLabel(self.baseModel)
        self.outputNameEdit = qt.QLineEdit()
        self.epochsSpinBox = qt.QSpinBox()
        self.epochsSpinBox.setRange(1, 10000)
        self.epochsSpinBox.setValue(100)
        self.budgetSpinBox = qt.QDoubleSpinBox()
        self.budgetSpinBox.setRange(0, 100000)
        self.budgetSpinBox.setSuffix(" min")
        self.budgetSpinBox.setToolTip(_("Stop after this many minutes (0: no limit; epochs still apply)"))
        self.trainSelector = qt.QComboBox()
        for mode, text in TRAIN_MODES.items():
            self.trainSelector.addItem(text, mode)
        self.deviceSelector = qt.QComboBox()
        for device in DEVICES:
            self.deviceSelector.addItem(device, device)
        self.deviceSelector.setCurrentIndex(max(self.deviceSelector.findData(self.device), 0))
        form.addRow(_("Model to extend:"), self.baseModelLabel)
        form.addRow(_("New model name:"), self.outputNameEdit)
        form.addRow(_("Epochs:"), self.epochsSpinBox)
        form.addRow(_("Time budget:"), self.budgetSpinBox)
        form.addRow(_("What to train:"), self.trainSelector)
        form.addRow(_("Device:"), self.deviceSelector)
        layout.addLayout(form)
        layout.addWidget(qt.QLabel(_("Old classes are protected by the base model's own predictions on your "
                                     "images (pseudo-labels); the base model file is never changed.")))

    def settings(self) -> TrainingSettings:
        budget = self.budgetSpinBox.value
        return TrainingSettings(base_model=self.baseModel, output_name=self.outputNameEdit.text.strip(),
                                epochs=int(self.epochsSpinBox.value),
                                time_budget_minutes=budget if budget > 0 else None,
                                train=self.trainSelector.itemData(self.trainSelector.currentIndex),
                                device=self.deviceSelector.itemData(self.deviceSelector.currentIndex))

    # --- page 4: run ---------------------------------------------------------------------------------

    def _buildRunPage(self, layout) -> None:
        self.progressBar = qt.QProgressBar()
        self.progressBar.setRange(0, 100)
        layout.addWidget(self.progressBar)
        self.lossPlot = qt.QLabel()
        self.lossPlot.setMinimumSize(400, 160)
        self.lossPlot.setToolTip(_("Training loss"))
        layout.addWidget(self.lossPlot)
        self.runLog = qt.QPlainTextEdit()
        self.runLog.setReadOnly(True)
        layout.addWidget(self.runLog)
        self.startButton = qt.QPushButton(_("Start training"))
        layout.addWidget(self.startButton)
        self.startButton.connect("clicked(bool)", self.onStartOrCancel)

    def onStartOrCancel(self) -> None:
        if self.run is not None:
            self.run.cancel()
            self.onPoll()
            return
        self.errorLabel.setText("")
        tempDir = None
        try:
            tempDir = unique_temp_dir("UniversalSegExtend")
            cases = [self.logic.exportTrainingCase(volume, segmentation, mapping, tempDir / f"scene{i:03d}")
                     for i, (volume, segmentation, mapping) in enumerate(self.sceneCases)] + self.folderCases
            self.run = self.logic.startAddClasses(self.newClasses(), cases, self.settings(), tempDir=tempDir,
                                                  progressCallback=self.onProgress,
                                                  logCallback=self.runLog.appendPlainText)
        except Exception as e:
            if tempDir is not None:
                shutil.rmtree(tempDir, ignore_errors=True)
            self.errorLabel.setText(str(e))
            return
        self.startButton.setText(_("Cancel training"))
        self.backButton.setEnabled(False)
        self.nextButton.setEnabled(False)
        self.timer.start()

    def onProgress(self, event: ProgressEvent) -> None:
        if event.fraction is not None:
            self.progressBar.setValue(int(round(100 * event.fraction)))
        if event.message:
            self.runLog.appendPlainText(event.message)
        if "loss" in event.data:
            self.drawLoss()

    def drawLoss(self) -> None:
        width, height = 400, 160
        pixmap = qt.QPixmap(width, height)
        pixmap.fill(qt.QColor(255, 255, 255))
        painter = qt.QPainter(pixmap)
        painter.setPen(qt.QPen(qt.QColor(30, 90, 200), 2))
        points = plot_coordinates(self.run.lossHistory.points if self.run else [], width, height)
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            painter.drawLine(x0, y0, x1, y1)
        painter.end()
        self.lossPlot.setPixmap(pixmap)

    def onPoll(self) -> None:
        if self.run is None or not self.run.step():
            return
        self.timer.stop()
        run, self.run = self.run, None
        self.startButton.setText(_("Start training"))
        self.backButton.setEnabled(True)
        self.nextButton.setEnabled(True)
        if run.cancelled:
            self.runLog.appendPlainText(_("Cancelled; no model was written."))
        elif run.error:
            self.errorLabel.setText(_("Training failed: {error}").format(error=run.error))
        else:
            self.finishedRun = run
            self.showReport(run)
            self.showPage(4)

    # --- page 5: report --------------------------------------------------------------------------------

    def _buildReportPage(self, layout) -> None:
        self.reportSummary = qt.QLabel()
        self.reportSummary.setWordWrap(True)
        layout.addWidget(self.reportSummary)
        self.reportTable = qt.QTableWidget(0, 4)
        self.reportTable.setHorizontalHeaderLabels(["Measure", "Class", "Dice", "Naive fine-tuning"])
        layout.addWidget(self.reportTable)
        row = qt.QHBoxLayout()
        self.keepButton = qt.QPushButton(_("Use this model"))
        self.discardButton = qt.QPushButton(_("Discard it"))
        row.addWidget(self.keepButton)
        row.addWidget(self.discardButton)
        layout.addLayout(row)
        self.keepButton.connect("clicked(bool)", self.onKeep)
        self.discardButton.connect("clicked(bool)", self.onDiscard)

    def showReport(self, run) -> None:
        report = run.report
        rows = report.rows() if report else []
        self.reportSummary.setText(_("Saved as {path}.").format(path=run.modelPath) + "\n" + (report.summary if report
                                                                                             else ""))
        self.reportTable.setRowCount(len(rows))
        for r, (kind, key, value, naive) in enumerate(rows):
            for c, text in enumerate((kind, key, f"{value:.3f}", "" if naive is None else f"{naive:.3f}")):
                self.reportTable.setItem(r, c, qt.QTableWidgetItem(text))

    def onKeep(self) -> None:
        self.createdModel = self.finishedRun.modelPath.name
        self.onClose()

    def onDiscard(self) -> None:
        if slicer.util.confirmYesNoDisplay(_("Delete the new model {path}?").format(path=self.finishedRun.modelPath)):
            shutil.rmtree(self.finishedRun.modelPath, ignore_errors=True)
            self.logic.clearCaches()
            self.onClose()

    # --- navigation ------------------------------------------------------------------------------------

    def showPage(self, index: int) -> None:
        self.stack.setCurrentIndex(index)
        self.titleLabel.setText(f"<b>{index + 1}/{len(self.PAGES)}: {self.PAGES[index]}</b>")
        self.backButton.setEnabled(0 < index < 4)
        self.nextButton.setEnabled(index < 3)
        if index == 1:
            self.targetClassSelector.clear()
            for c in self.newClasses():
                self.targetClassSelector.addItem(c.key)
        if index == 2 and not self.outputNameEdit.text:
            self.outputNameEdit.setText(f"{self.baseModel}-plus-{'-'.join(c.key for c in self.newClasses())}")

    def pageErrors(self, index: int) -> list[str]:
        if index == 0:
            try:
                return self.logic.checkNewClasses(self.newClasses(), self.baseModel)
            except Exception as e:  # the backend could not check them: say why, stay on the page
                return [str(e)]
        if index == 1:
            return validate_cases(self.plannedCases(), [c.key for c in self.newClasses()])
        if index == 2:
            return validate_settings(self.settings(), [m["name"] for m in self.logic.listModels()])
        return []

    def onNext(self) -> None:
        index = self.stack.currentIndex
        errors = self.pageErrors(index)
        self.errorLabel.setText("\n".join(errors))
        if not errors:
            self.showPage(index + 1)

    def onBack(self) -> None:
        self.errorLabel.setText("")
        self.showPage(max(self.stack.currentIndex - 1, 0))

    def onClose(self) -> None:
        """The Close button: asks before cancelling a running training."""
        if self.run is not None and not slicer.util.confirmYesNoDisplay(
                _("Training is running. Cancel it and close?")):
            return
        self.dialog.close()  # rejects the dialog: onDialogFinished does the rest
        self.onDialogFinished()

    def onDialogFinished(self, result: int | None = None) -> None:
        """However the dialog closes (Close, X, Esc): cancel a running training (no model is written),
        stop polling, and tell the panel once."""
        if self._finished:
            return
        self._finished = True
        if self.run is not None:
            self.run.cancel()
            self.run = None
        self.timer.stop()
        if self.finishedCallback:
            self.finishedCallback(self)
