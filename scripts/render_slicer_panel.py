"""Render the Slicer module's panel (UniversalSeg/Resources/UI/UniversalSeg.ui) to a PNG, without Slicer.

The extension catalogue shows Resources/Screenshot01.png (EXTENSION_SCREENSHOTURLS in CMakeLists.txt).
Slicer cannot run here, so this loads the real .ui with a real Qt (PyQt5) after mapping Slicer's and
CTK's widget classes to the plain Qt widgets they derive from (ctkCollapsibleButton -> QGroupBox,
qMRMLNodeComboBox -> QComboBox, ...), fills the widgets as the panel looks after a run on the bundled
sample CT, and grabs the widget. Needs a display: run it under Xvfb.

    pip install PyQt5==5.15.11
    PYTHONPATH=UniversalSeg xvfb-run -a -s "-screen 0 1280x1280x24" python scripts/render_slicer_panel.py \
        --statistics statistics.json -o Resources/Screenshot01.png

`--statistics` takes the statistics.json of a predict run, so the results table shows a real run's
figures (without it the table stays empty). The committed image used
    universalseg predict UniversalSegLib/resources/sample/ct_abdomen.nii.gz -o out --device cpu \
        --formats stats --classes liver spleen kidney_left kidney_right pancreas aorta \
        inferior_vena_cava vertebrae_L1
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UI_FILE = REPO / "UniversalSeg" / "Resources" / "UI" / "UniversalSeg.ui"

# Slicer/CTK class -> the Qt class that stands in for it on the screenshot
STAND_INS = {"qMRMLWidget": "QWidget", "ctkCollapsibleButton": "QGroupBox", "qMRMLNodeComboBox": "QComboBox",
             "ctkPathLineEdit": "QLineEdit", "qMRMLSegmentationShow3DButton": "QPushButton"}
# properties of those classes that the Qt stand-ins lack
SLICER_ONLY_PROPERTIES = {"nodeTypes", "showChildNodeTypes", "addEnabled", "removeEnabled", "noneEnabled",
                          "noneDisplay", "renameEnabled", "filters", "collapsed"}


def plain_qt_ui(path: Path) -> tuple[bytes, set[str]]:
    """The .ui with stand-in classes, and the names of the collapsed sections."""
    tree = ET.parse(path)
    root = tree.getroot()
    collapsed = set()
    for widget in root.iter("widget"):
        cls = widget.get("class")
        for prop in list(widget.findall("property")):
            if cls in STAND_INS and prop.get("name") in SLICER_ONLY_PROPERTIES:
                if prop.get("name") == "collapsed" and prop.findtext("bool") == "true":
                    collapsed.add(widget.get("name"))
                widget.remove(prop)
            elif cls == "ctkCollapsibleButton" and prop.get("name") == "text":
                prop.set("name", "title")
        if cls in STAND_INS:
            widget.set("class", STAND_INS[cls])
    for section in ("customwidgets", "connections"):
        for element in root.findall(section):
            root.remove(element)
    out = io.BytesIO()
    tree.write(out, encoding="utf-8", xml_declaration=True)
    return out.getvalue(), collapsed


def fill(ui, statistics: list[dict]) -> None:
    """What a user sees after segmenting the bundled sample CT with the bundled model."""
    from PyQt5 import QtCore, QtWidgets

    try:  # the Slicer module's plain helpers, from UniversalSeg/ on PYTHONPATH (see the usage above)
        from UniversalSegModuleLib.classes import GROUP_TITLES, group_classes, selection_summary
    except ModuleNotFoundError:
        sys.exit(f"render_slicer_panel: run with PYTHONPATH={REPO / 'UniversalSeg'} (the module's helpers)")

    manifest_path = REPO / "UniversalSegLib" / "resources" / "models" / "universalseg-demo" / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    classes = manifest["classes"]
    selected = {row["key"] for row in statistics} or {c["key"] for c in classes}

    ui.inputVolumeSelector.addItem("AbdomenCT")
    ui.outputSegmentationSelector.addItems(["AbdomenCT UniversalSeg", "Create new segmentation"])
    ui.segmentationShow3DButton.setText("Show 3D")
    ui.segmentationShow3DButton.setMaximumWidth(90)
    ui.segmentationShow3DButton.setCheckable(True)
    ui.segmentationShow3DButton.setChecked(True)
    ui.modelSelector.addItem(f"{manifest['name']} (v{manifest.get('version', '0.1.0')})")
    ui.modelInfoLabel.setText(f"{len(classes)} classes, {manifest['backbone']} backbone. "
                              f"License: {manifest.get('license', 'Apache-2.0')}")
    for group, members in group_classes(classes):
        item = QtWidgets.QTreeWidgetItem([GROUP_TITLES[group]])
        ui.classTree.addTopLevelItem(item)
        states = set()
        for c in members:
            child = QtWidgets.QTreeWidgetItem(item, [c["name"]])
            state = QtCore.Qt.Checked if c["key"] in selected else QtCore.Qt.Unchecked
            child.setCheckState(0, state)
            states.add(state)
        item.setCheckState(0, states.pop() if len(states) == 1 else QtCore.Qt.PartiallyChecked)
        item.setExpanded(group == "organ")
    ui.selectionLabel.setText(selection_summary(sorted(selected), len(classes)))
    ui.deviceSelector.addItems(["Auto (GPU if available)", "GPU (CUDA)", "CPU"])
    ui.modelsFolderSelector.setText(str(Path.home() / ".universalseg" / "models"))
    ui.backendInfoLabel.setText("Backend 0.1.0 installed")
    ui.applyButton.setEnabled(True)
    ui.progressBar.setVisible(False)
    table = ui.resultsTable
    table.setRowCount(len(statistics))
    warning = table.style().standardIcon(QtWidgets.QStyle.SP_MessageBoxWarning)
    for r, row in enumerate(statistics):
        values = [row["name"], f"{row['volume_ml']:.1f}", "" if row.get("mean_hu") is None else f"{row['mean_hu']:.0f}",
                  "" if row.get("mean_confidence") is None else f"{row['mean_confidence']:.2f}"]
        for c, value in enumerate(values):
            table.setItem(r, c, QtWidgets.QTableWidgetItem(value))
        notes = (["not found in this scan"] if row.get("empty") else []) + \
            ([f"low confidence ({row['mean_confidence']:.2f})"] if row.get("low_confidence") else []) + \
            (["touches the scan border"] if row.get("touches_border") else [])
        note = QtWidgets.QTableWidgetItem("; ".join(notes))
        if notes:
            note.setIcon(warning)
        table.setItem(r, 4, note)
    table.resizeColumnsToContents()
    table.verticalHeader().setVisible(False)
    table.setMinimumHeight(min(40 + 30 * len(statistics), 300))


def render(output: Path, statistics: list[dict], width: int = 440, height: int = 1180) -> Path:
    from PyQt5 import QtWidgets, uic

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    app.setStyle("Fusion")
    text, collapsed = plain_qt_ui(UI_FILE)
    panel = uic.loadUi(io.BytesIO(text))
    for name in collapsed:  # a collapsed section shows its title only
        box = getattr(panel, name)
        for child in box.findChildren(QtWidgets.QWidget):
            child.setVisible(False)
        box.setTitle(box.title() + " (collapsed)")
    fill(panel, statistics)
    panel.resize(width, height)
    panel.show()
    app.processEvents()
    output.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(output), "PNG"):
        raise SystemExit(f"could not write {output}")
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=REPO / "Resources" / "Screenshot01.png")
    parser.add_argument("--statistics", type=Path, help="statistics.json of a predict run on the sample CT")
    args = parser.parse_args(argv)
    statistics = json.loads(args.statistics.read_text()) if args.statistics else []
    if isinstance(statistics, dict):
        statistics = statistics.get("classes", [])
    print(render(args.output, statistics))


if __name__ == "__main__":
    main()
