"""Continual learning: add classes to a trained model from new data only, without forgetting.

`extend_model(base, new_classes, data, output_name, ...)` returns an `ExtensionReport`; the CLI is
`universalseg extend` (see `continual.command`). Names are imported lazily, so the CLI can register
its sub-command without loading torch.
"""

from __future__ import annotations

from UniversalSegLib._lazy import lazy_getattr

_LAZY = {
    "extend_model": "UniversalSegLib.continual.extend",
    "ExtensionReport": "UniversalSegLib.continual.report",
    "ExtensionCancelled": "UniversalSegLib.continual.control",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = list(_LAZY)
