"""Importers: convert model checkpoints published by others into UniversalSeg model files.

Lazy like the top-level package, so the CLI can register `import-checkpoint` without importing torch.
"""

from __future__ import annotations

_LAZY = {
    "import_checkpoint": "UniversalSegLib.importers.clip_driven_universal",
    "read_checkpoint_state": "UniversalSegLib.importers.clip_driven_universal",
    "map_state_dict": "UniversalSegLib.importers.clip_driven_universal",
    "published_layout": "UniversalSegLib.importers.clip_driven_universal",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'UniversalSegLib.importers' has no attribute {name!r}")


__all__ = list(_LAZY)
