"""Stand-in for PythonQt's `qt` module: only the classes and members UniversalSeg uses (see README.md)."""

from __future__ import annotations

import inspect


class Signal:
    """A Qt signal: slots are called synchronously with as many arguments as they accept (as PythonQt)."""

    def __init__(self, owner: QObject):
        self.owner = owner
        self.slots: list = []

    def connect(self, slot) -> None:
        self.slots.append(slot)

    def emit(self, *args) -> None:
        if self.owner._blocked:
            return
        for slot in list(self.slots):
            try:
                params = inspect.signature(slot).parameters.values()
                if not any(p.kind == p.VAR_POSITIONAL for p in params):
                    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
                    args = args[:len(positional)]
            except (TypeError, ValueError):
                pass
            slot(*args)


class QObject:
    """Mimics Qt 5's QObject as PythonQt wraps it (qt.QObject)."""

    SIGNALS: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        self._blocked = False
        self._signals = {sig.split("(")[0]: Signal(self) for cls in type(self).__mro__
                         for sig in getattr(cls, "SIGNALS", ())}
        self._signatures = {sig for cls in type(self).__mro__ for sig in getattr(cls, "SIGNALS", ())}
        self.name = ""
        self.dynamicProperties: dict = {}

    def connect(self, signature: str, slot) -> None:
        if signature not in self._signatures:
            raise AttributeError(f"{type(self).__name__} has no signal {signature!r}")
        self._signals[signature.split("(")[0]].connect(slot)

    def signal(self, name: str) -> Signal:
        """Test helper: the signal object, to emit it."""
        return self._signals[name]

    def blockSignals(self, block: bool) -> bool:
        old, self._blocked = self._blocked, bool(block)
        return old

    def property(self, name: str):
        return self.dynamicProperties.get(name)

    def setProperty(self, name: str, value) -> None:
        self.dynamicProperties[name] = value


class QWidget(QObject):
    """Mimics Qt 5's QWidget as PythonQt wraps it (qt.QWidget)."""

    def __init__(self, parent=None, *args):
        super().__init__()
        self._enabled = True
        self._visible = True
        self._toolTip = ""
        self._layout = None
        self.children: list = []

    enabled = property(lambda self: self._enabled)
    toolTip = property(lambda self: self._toolTip)
    visible = property(lambda self: self._visible)

    def setEnabled(self, enabled: bool) -> None:
        self._enabled = bool(enabled)

    def setVisible(self, visible: bool) -> None:
        self._visible = bool(visible)

    def isVisible(self) -> bool:
        return self._visible

    def setToolTip(self, text: str) -> None:
        self._toolTip = str(text)

    def setLayout(self, layout) -> None:
        self._layout = layout

    def layout(self):
        return self._layout

    def show(self) -> None:
        self._visible = True

    def close(self) -> bool:
        self._visible = False
        return True

    def setStyleSheet(self, text: str) -> None:
        pass

    def setMinimumSize(self, width: int, height: int) -> None:
        pass

    def resize(self, width: int, height: int) -> None:
        pass

    def setWindowTitle(self, title: str) -> None:
        self.windowTitle = title


class QLabel(QWidget):
    """Mimics Qt 5's QLabel as PythonQt wraps it (qt.QLabel)."""

    def __init__(self, text: str = "", parent=None):
        super().__init__(parent)
        self._text = str(text)
        self.pixmap = None

    text = property(lambda self: self._text)

    def setText(self, text: str) -> None:
        self._text = str(text)

    def setWordWrap(self, on: bool) -> None:
        pass

    def setPixmap(self, pixmap) -> None:
        self.pixmap = pixmap


class QPushButton(QWidget):
    """Mimics Qt 5's QPushButton as PythonQt wraps it (qt.QPushButton)."""

    SIGNALS = ("clicked(bool)", "clicked()", "toggled(bool)")

    def __init__(self, text: str = "", parent=None):
        super().__init__(parent)
        self._text = str(text)

    text = property(lambda self: self._text)

    def setText(self, text: str) -> None:
        self._text = str(text)

    def click(self) -> None:
        """Test helper: a user click (ignored when disabled, as in Qt)."""
        if self._enabled:
            self._signals["clicked"].emit(False)


class QCheckBox(QPushButton):
    """Mimics Qt 5's QCheckBox as PythonQt wraps it (qt.QCheckBox)."""

    def __init__(self, text: str = "", parent=None):
        super().__init__(text, parent)
        self._checked = False

    checked = property(lambda self: self._checked)

    def setChecked(self, checked: bool) -> None:
        """Emits toggled(bool) on a change, never clicked (QAbstractButton::setChecked)."""
        if bool(checked) != self._checked:
            self._checked = bool(checked)
            self._signals["toggled"].emit(self._checked)

    def click(self) -> None:
        """Test helper: a user click toggles a check box, then emits clicked(checked) (QAbstractButton::click)."""
        if self._enabled:
            self.setChecked(not self._checked)
            self._signals["clicked"].emit(self._checked)


class QLineEdit(QWidget):
    """Mimics Qt 5's QLineEdit as PythonQt wraps it (qt.QLineEdit)."""

    SIGNALS = ("textChanged(QString)", "textEdited(QString)")
    Normal = 0

    def __init__(self, text: str = "", parent=None):
        super().__init__(parent)
        self._text = str(text)
        self._modified = False
        self.placeholderText = ""

    text = property(lambda self: self._text)

    def setText(self, text: str) -> None:
        if str(text) != self._text:
            self._text = str(text)
            self._signals["textChanged"].emit(self._text)

    def isModified(self) -> bool:
        return self._modified

    def setPlaceholderText(self, text: str) -> None:
        self.placeholderText = text

    def typeText(self, text: str) -> None:
        """Test helper: the user types (sets `modified`, emits textEdited then textChanged)."""
        self._modified = True
        self._text = str(text)
        self._signals["textEdited"].emit(self._text)
        self._signals["textChanged"].emit(self._text)


class QComboBox(QWidget):
    """Mimics Qt 5's QComboBox as PythonQt wraps it (qt.QComboBox)."""

    SIGNALS = ("currentIndexChanged(int)", "currentTextChanged(QString)")

    def __init__(self, parent=None):
        super().__init__(parent)
        self._items: list[tuple[str, object]] = []
        self._roles: dict[tuple[int, int], object] = {}
        self._index = -1

    count = property(lambda self: len(self._items))
    currentIndex = property(lambda self: self._index)
    currentText = property(lambda self: self._items[self._index][0] if self._index >= 0 else "")

    def addItem(self, text: str, userData=None) -> None:
        self._items.append((str(text), userData))
        if self._index < 0:
            self.setCurrentIndex(0)

    def clear(self) -> None:
        self._items, self._roles = [], {}
        self.setCurrentIndex(-1)

    def itemData(self, index: int, role: int = 256):  # Qt.UserRole
        if not 0 <= index < len(self._items):
            return None
        return self._items[index][1] if role == Qt.UserRole else self._roles.get((index, role))

    def setItemData(self, index: int, value, role: int = 256) -> None:
        if role == Qt.UserRole:
            self._items[index] = (self._items[index][0], value)
        else:  # e.g. Qt.ToolTipRole, or Qt.UserRole - 1: the item's flags in Qt's QStandardItemModel
            self._roles[(index, role)] = value

    def isItemEnabled(self, index: int) -> bool:
        """Stub-only: what Qt shows greyed out (flags without ItemIsEnabled set through role UserRole - 1)."""
        flags = self._roles.get((index, Qt.UserRole - 1))
        return flags is None or bool(flags & Qt.ItemIsEnabled)

    def itemText(self, index: int) -> str:
        return self._items[index][0] if 0 <= index < len(self._items) else ""

    def findData(self, data) -> int:
        return next((i for i, (_t, d) in enumerate(self._items) if d == data), -1)

    def setCurrentIndex(self, index: int) -> None:
        index = index if -1 <= index < len(self._items) else -1
        if index != self._index:
            self._index = index
            self._signals["currentIndexChanged"].emit(index)
            self._signals["currentTextChanged"].emit(self.currentText)


class QSpinBox(QWidget):
    """Mimics Qt 5's QSpinBox as PythonQt wraps it (qt.QSpinBox)."""

    SIGNALS = ("valueChanged(int)",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._value = 0
        self._range = (0, 99)

    value = property(lambda self: self._value)

    def setRange(self, low, high) -> None:
        self._range = (low, high)

    def setValue(self, value) -> None:
        self._value = min(max(value, self._range[0]), self._range[1])

    def setSuffix(self, suffix: str) -> None:
        pass


class QDoubleSpinBox(QSpinBox):
    """Mimics Qt 5's QDoubleSpinBox as PythonQt wraps it (qt.QDoubleSpinBox)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._value = 0.0


class QProgressBar(QWidget):
    """Mimics Qt 5's QProgressBar as PythonQt wraps it (qt.QProgressBar)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._value = 0
        self.format = "%p%"

    value = property(lambda self: self._value)

    def setValue(self, value: int) -> None:
        if not isinstance(value, int):
            raise TypeError("QProgressBar.setValue takes an int")
        self._value = value

    def setRange(self, low: int, high: int) -> None:
        pass

    def setFormat(self, text: str) -> None:
        self.format = text


class QPlainTextEdit(QWidget):
    """Mimics Qt 5's QPlainTextEdit as PythonQt wraps it (qt.QPlainTextEdit)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.lines: list[str] = []

    def appendPlainText(self, text: str) -> None:
        self.lines.append(str(text))

    def clear(self) -> None:
        self.lines = []

    def toPlainText(self) -> str:
        return "\n".join(self.lines)

    def setReadOnly(self, on: bool) -> None:
        pass


class Qt:
    """Mimics the Qt namespace enums PythonQt exposes as qt.Qt."""

    Unchecked, PartiallyChecked, Checked = 0, 1, 2
    UserRole = 256
    ToolTipRole = 3
    ItemIsUserCheckable = 16
    ItemIsEnabled = 32
    WaitCursor = 16


class QTreeWidgetItem:
    """Mimics Qt 5's QTreeWidgetItem as PythonQt wraps it (qt.QTreeWidgetItem)."""

    def __init__(self, parent=None):
        self._text: dict[int, str] = {}
        self._data: dict[tuple[int, int], object] = {}
        self._check: dict[int, int] = {}
        self._children: list[QTreeWidgetItem] = []
        self._hidden = False
        self._expanded = False
        self._flags = 0
        self._parent = parent if isinstance(parent, QTreeWidgetItem) else None
        self._tree = None
        if self._parent is not None:
            self._parent._children.append(self)

    def tree(self):
        return self._tree if self._parent is None else self._parent.tree()

    def setText(self, column: int, text: str) -> None:
        self._text[column] = str(text)

    def text(self, column: int) -> str:
        return self._text.get(column, "")

    def setToolTip(self, column: int, text: str) -> None:
        pass

    def setData(self, column: int, role: int, value) -> None:
        self._data[(column, role)] = value

    def data(self, column: int, role: int):
        return self._data.get((column, role))

    def setFlags(self, flags: int) -> None:
        self._flags = flags

    def flags(self) -> int:
        return self._flags

    def setCheckState(self, column: int, state: int) -> None:
        changed = self._check.get(column) != state
        self._check[column] = state
        tree = self.tree()
        if changed and tree is not None:
            tree.signal("itemChanged").emit(self, column)

    def checkState(self, column: int) -> int:
        return self._check.get(column, Qt.Unchecked)

    def childCount(self) -> int:
        return len(self._children)

    def child(self, index: int) -> QTreeWidgetItem:
        return self._children[index]

    def setHidden(self, hidden: bool) -> None:
        self._hidden = bool(hidden)

    def isHidden(self) -> bool:
        return self._hidden

    def setExpanded(self, expanded: bool) -> None:
        self._expanded = bool(expanded)


class QTreeWidget(QWidget):
    """Mimics Qt 5's QTreeWidget as PythonQt wraps it (qt.QTreeWidget)."""

    SIGNALS = ("itemChanged(QTreeWidgetItem*,int)",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._items: list[QTreeWidgetItem] = []

    topLevelItemCount = property(lambda self: len(self._items))

    def clear(self) -> None:
        self._items = []

    def addTopLevelItem(self, item: QTreeWidgetItem) -> None:
        item._tree = self
        self._items.append(item)

    def topLevelItem(self, index: int) -> QTreeWidgetItem:
        return self._items[index]


class QIcon:
    """Mimics Qt 5's QIcon as PythonQt wraps it (qt.QIcon)."""

    def __init__(self, path: str = ""):
        self.path = path


class QStyle:
    """Mimics Qt 5's QStyle as PythonQt wraps it (qt.QStyle)."""

    SP_MessageBoxWarning = 10


class QTableWidgetItem:
    """Mimics Qt 5's QTableWidgetItem as PythonQt wraps it (qt.QTableWidgetItem)."""

    def __init__(self, text: str = ""):
        self._text = str(text)
        self._icon = None
        self._toolTip = ""

    def text(self) -> str:
        return self._text

    def setIcon(self, icon: QIcon) -> None:
        self._icon = icon

    def icon(self):
        return self._icon

    def setToolTip(self, text: str) -> None:
        self._toolTip = text

    def toolTip(self) -> str:
        return self._toolTip


class QTableWidget(QWidget):
    """Mimics Qt 5's QTableWidget as PythonQt wraps it (qt.QTableWidget)."""

    def __init__(self, rows: int = 0, columns: int = 0, parent=None):
        super().__init__(parent)
        self._rows = rows
        self._columns = columns
        self._items: dict[tuple[int, int], object] = {}
        self._widgets: dict[tuple[int, int], object] = {}
        self._current = -1
        self.headers: list[str] = []

    rowCount = property(lambda self: self._rows)
    columnCount = property(lambda self: self._columns)

    def setRowCount(self, rows: int) -> None:
        self._rows = rows
        self._items = {k: v for k, v in self._items.items() if k[0] < rows}

    def setColumnCount(self, columns: int) -> None:
        self._columns = columns

    def setHorizontalHeaderLabels(self, labels) -> None:
        self.headers = list(labels)
        self._columns = max(self._columns, len(self.headers))

    def _check(self, row: int, column: int) -> None:
        if not (0 <= row < self._rows and 0 <= column < self._columns):
            raise IndexError(f"cell ({row}, {column}) outside {self._rows}x{self._columns}")

    def setItem(self, row: int, column: int, item: QTableWidgetItem) -> None:
        self._check(row, column)
        self._items[(row, column)] = item

    def item(self, row: int, column: int):
        return self._items.get((row, column))

    def setCellWidget(self, row: int, column: int, widget) -> None:
        self._check(row, column)
        self._widgets[(row, column)] = widget

    def cellWidget(self, row: int, column: int):
        return self._widgets.get((row, column))

    def insertRow(self, row: int) -> None:
        shift = lambda d: {(r + (r >= row), c): v for (r, c), v in d.items()}  # noqa: E731
        self._items, self._widgets = shift(self._items), shift(self._widgets)
        self._rows += 1

    def removeRow(self, row: int) -> None:
        keep = lambda d: {(r - (r > row), c): v for (r, c), v in d.items() if r != row}  # noqa: E731
        self._items, self._widgets = keep(self._items), keep(self._widgets)
        self._rows -= 1

    def currentRow(self) -> int:
        return self._current

    def setCurrentCell(self, row: int, column: int) -> None:
        self._current = row

    def resizeColumnsToContents(self) -> None:
        pass


class QStackedWidget(QWidget):
    """Mimics Qt 5's QStackedWidget as PythonQt wraps it (qt.QStackedWidget)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._pages: list = []
        self._index = -1

    currentIndex = property(lambda self: self._index)
    count = property(lambda self: len(self._pages))

    def addWidget(self, widget) -> int:
        self._pages.append(widget)
        if self._index < 0:
            self._index = 0
        return len(self._pages) - 1

    def setCurrentIndex(self, index: int) -> None:
        if not 0 <= index < len(self._pages):
            raise IndexError(index)
        self._index = index


class QDialog(QWidget):
    """qdialog.cpp: accept()/reject() end in done(r), which hides the dialog and emits finished(int)
    (and accepted()/rejected()); the title-bar X (closeEvent) and Esc (keyPressEvent) call reject()."""

    Accepted, Rejected = 1, 0
    SIGNALS = ("finished(int)", "accepted()", "rejected()")

    def exec_(self) -> int:
        self._visible = True
        return self.Accepted

    def done(self, result: int) -> None:
        self._visible = False
        self._signals["finished"].emit(result)
        self._signals["accepted" if result == self.Accepted else "rejected"].emit()

    def accept(self) -> None:
        self.done(self.Accepted)

    def reject(self) -> None:
        self.done(self.Rejected)

    def close(self) -> bool:
        if self._visible:  # QDialog::closeEvent rejects a visible dialog
            self.reject()
        return True

    def pressEscape(self) -> None:
        """Test helper: the user presses Esc (QDialog::keyPressEvent -> reject())."""
        self.reject()


class _Layout:
    """Mimics QLayout (qlayout.cpp): widgets and layouts in order."""

    def __init__(self, parent=None):
        self.items: list = []
        if parent is not None:
            parent.setLayout(self)

    def addWidget(self, widget, *args) -> None:
        self.items.append(widget)

    def addLayout(self, layout, *args) -> None:
        self.items.append(layout)


class QVBoxLayout(_Layout):
    """Mimics Qt 5's QVBoxLayout as PythonQt wraps it (qt.QVBoxLayout)."""


class QHBoxLayout(_Layout):
    """Mimics Qt 5's QHBoxLayout as PythonQt wraps it (qt.QHBoxLayout)."""


class QFormLayout(_Layout):
    """Mimics Qt 5's QFormLayout as PythonQt wraps it (qt.QFormLayout)."""

    def addRow(self, label, field) -> None:
        self.items.append((label, field))


class QColor:
    """Mimics Qt 5's QColor as PythonQt wraps it (qt.QColor)."""

    def __init__(self, r: int = 0, g: int = 0, b: int = 0, a: int = 255):
        for v in (r, g, b):
            if not isinstance(v, int):
                raise TypeError("QColor takes ints")
        self._rgb = (r, g, b)

    def red(self) -> int:
        return self._rgb[0]

    def green(self) -> int:
        return self._rgb[1]

    def blue(self) -> int:
        return self._rgb[2]


class QPixmap:
    """Mimics Qt 5's QPixmap as PythonQt wraps it (qt.QPixmap)."""

    def __init__(self, width: int, height: int):
        self.size = (width, height)

    def fill(self, color: QColor) -> None:
        pass


class QPen:
    """Mimics Qt 5's QPen as PythonQt wraps it (qt.QPen)."""

    def __init__(self, color: QColor, width: int = 1):
        self.color = color


class QPainter:
    """Mimics Qt 5's QPainter as PythonQt wraps it (qt.QPainter)."""

    def __init__(self, device: QPixmap):
        self.device = device
        self.lines: list = []
        device.painted = self.lines

    def setPen(self, pen: QPen) -> None:
        pass

    def drawLine(self, x0: int, y0: int, x1: int, y1: int) -> None:
        if not all(isinstance(v, int) for v in (x0, y0, x1, y1)):
            raise TypeError("QPainter.drawLine takes ints")
        self.lines.append((x0, y0, x1, y1))

    def end(self) -> bool:
        return True


class QTimer(QObject):
    """Mimics Qt 5's QTimer as PythonQt wraps it (qt.QTimer)."""

    SIGNALS = ("timeout()",)
    pending: list = []  # singleShot callbacks

    def __init__(self, parent=None):
        super().__init__()
        self._active = False
        self.interval = 0

    def setInterval(self, ms: int) -> None:
        self.interval = ms

    def start(self, ms: int | None = None) -> None:
        self._active = True

    def stop(self) -> None:
        self._active = False

    def isActive(self) -> bool:
        return self._active

    def fire(self) -> None:
        """Test helper: one timeout."""
        if self._active:
            self._signals["timeout"].emit()

    @staticmethod
    def singleShot(ms: int, callback) -> None:
        QTimer.pending.append(callback)


class QSettings:
    """In-memory settings shared by all instances (one process = one user profile)."""

    store: dict = {}

    def value(self, key: str, default=None):
        return self.store.get(key, default)

    def setValue(self, key: str, value) -> None:
        self.store[key] = value

    def contains(self, key: str) -> bool:
        return key in self.store


class QFileDialog:
    """Test helper attribute `answers`: the paths the next calls return."""

    answers: list = []

    @staticmethod
    def getOpenFileName(parent, caption="", directory="", filters="") -> str:
        return QFileDialog.answers.pop(0) if QFileDialog.answers else ""

    @staticmethod
    def getExistingDirectory(parent, caption="", directory="") -> str:
        return QFileDialog.answers.pop(0) if QFileDialog.answers else ""


class QInputDialog(QDialog):
    """Test helper attribute `answers`: what the user picks in the next dialogs; None is Cancel (and True,
    for a dialog object, OK on the preset value).

    The static getItem is PythonQt's: no `ok` flag, and on Cancel it returns the current item, as
    QInputDialog::getItem (qinputdialog.cpp) returns `items.value(current)` when the dialog is rejected.
    getText returns "" on Cancel (a null QString)."""

    answers: list = []

    def __init__(self, parent=None):
        super().__init__(parent)
        self._items: list[str] = []
        self._text = ""
        self.labelText = ""

    @staticmethod
    def _answer():
        return QInputDialog.answers.pop(0) if QInputDialog.answers else None

    @staticmethod
    def getItem(parent, title, label, items, current=0, editable=False) -> str:
        answer = QInputDialog._answer()
        return items[current] if answer is None else answer

    @staticmethod
    def getText(parent, title, label, mode=0, text="") -> str:
        answer = QInputDialog._answer()
        return "" if answer is None else answer

    def setLabelText(self, text: str) -> None:
        self.labelText = text

    def setComboBoxItems(self, items) -> None:
        self._items = list(items)
        self._text = self._items[0] if self._items else ""

    def setComboBoxEditable(self, editable: bool) -> None:
        pass

    def setTextValue(self, text: str) -> None:
        self._text = text

    def textValue(self) -> str:
        return self._text

    def exec_(self) -> int:
        """The next answer: None is Cancel, True is OK on the preset value, a string is picked then OK."""
        answer = self._answer()
        if answer is None:
            return self.Rejected
        if answer is not True:
            self._text = answer
        return self.Accepted
