"""Continual learning: add classes to a trained model from new data only, without forgetting.

`extend_model(base, new_classes, data, output_name, ...)` returns an `ExtensionReport`; the CLI is
`universalseg extend` (see `continual.command`). Names are imported lazily, so the CLI can register
its sub-command without loading torch.
"""

from __future__ import annotations

_LAZY = {
    "extend_model": "UniversalSegLib.continual.extend",
    "ExtensionReport": "UniversalSegLib.continual.report",
    "ExtensionCancelled": "UniversalSegLib.continual.control",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'UniversalSegLib.continual' has no attribute {name!r}")


__all__ = list(_LAZY)
