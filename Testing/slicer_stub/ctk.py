"""Stand-in for Slicer's `ctk` module: only the widgets UniversalSeg uses (see README.md)."""

from __future__ import annotations

import qt


class ctkCollapsibleButton(qt.QWidget):
    """Mimics CTK Libs/Widgets/ctkCollapsibleButton (text, collapsed)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.text = ""
        self.collapsed = False


class ctkPathLineEdit(qt.QWidget):
    """Mimics CTK Libs/Widgets/ctkPathLineEdit (currentPath, currentPathChanged)."""

    SIGNALS = ("currentPathChanged(QString)",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._path = ""
        self.filters = 0

    currentPath = property(lambda self: self._path)

    def setCurrentPath(self, path: str) -> None:
        if str(path) != self._path:
            self._path = str(path)
            self._signals["currentPathChanged"].emit(self._path)


class ctkColorPickerButton(qt.QWidget):
    """Mimics CTK Libs/Widgets/ctkColorPickerButton (color, colorChanged)."""

    SIGNALS = ("colorChanged(QColor)",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._color = qt.QColor(128, 128, 128)

    color = property(lambda self: self._color)

    def setColor(self, color: qt.QColor) -> None:
        self._color = color
