"""Stand-in for slicer.parameterNodeWrapper (see ../README.md): typed attributes stored on the
vtkMRMLScriptedModuleNode, Modified() on every change, and connectGui for the two widget kinds the
module binds (qMRMLNodeComboBox -> node, QCheckBox -> bool) through their SlicerParameterName."""

from __future__ import annotations

import itertools
import typing


def parameterNodeWrapper(cls):
    """Mimics Base/Python/slicer/parameterNodeWrapper/wrapper.py parameterNodeWrapper (connectGui etc.)."""
    hints = typing.get_type_hints(cls)
    defaults = {}
    for name, hint in hints.items():
        origin = typing.get_origin(hint)
        defaults[name] = getattr(cls, name, [] if origin is list else None)

    class Wrapper:
        __doc__ = cls.__doc__

        def __init__(self, parameterNode):
            object.__setattr__(self, "parameterNode", parameterNode)
            object.__setattr__(self, "_guis", {})
            object.__setattr__(self, "_tags", itertools.count(1))
            for name, value in defaults.items():
                parameterNode.values.setdefault(name, list(value) if isinstance(value, list) else value)

        def __getattr__(self, name):
            if name in defaults:
                value = self.parameterNode.values[name]
                return list(value) if isinstance(value, list) else value
            raise AttributeError(name)

        def __setattr__(self, name, value):
            if name not in defaults:
                raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
            if self.parameterNode.values.get(name) != value:
                self.parameterNode.values[name] = list(value) if isinstance(value, list) else value
                self.parameterNode.Modified()
                for widgets in self._guis.values():
                    for param, widget in widgets:
                        if param == name:
                            _to_widget(widget, value)

        def AddObserver(self, event, callback, priority=0.0):
            return self.parameterNode.AddObserver(event, callback, priority)

        def RemoveObserver(self, tag):
            self.parameterNode.RemoveObserver(tag)

        def connectGui(self, ui):
            widgets = [(w.property("SlicerParameterName"), w) for w in vars(ui).values()
                       if hasattr(w, "property") and w.property("SlicerParameterName")]
            for param, widget in widgets:
                if param not in defaults:
                    raise ValueError(f"widget {widget.name} names unknown parameter {param!r}")
                _to_widget(widget, self.parameterNode.values[param])
                if hasattr(widget, "currentNode"):
                    widget.connect("currentNodeChanged(vtkMRMLNode*)", lambda node, p=param: setattr(self, p, node))
                elif hasattr(widget, "setChecked"):
                    widget.connect("toggled(bool)", lambda on, p=param: setattr(self, p, bool(on)))
                else:
                    raise TypeError(f"the stand-in cannot bind {type(widget).__name__}")
            tag = next(self._tags)
            self._guis[tag] = widgets
            return tag

        def disconnectGui(self, tag):
            self._guis.pop(tag, None)

    Wrapper.__name__ = cls.__name__
    return Wrapper


def _to_widget(widget, value):
    if hasattr(widget, "setCurrentNode"):
        if value is not None:
            widget.setCurrentNode(value)
    elif hasattr(widget, "setChecked"):
        widget.setChecked(bool(value))
