"""Importers: convert model checkpoints published by others into UniversalSeg model files.

Lazy like the top-level package, so the CLI can register `import-checkpoint` without importing torch.
"""

from __future__ import annotations

from UniversalSegLib._lazy import lazy_getattr

_LAZY = {
    "import_checkpoint": "UniversalSegLib.importers.clip_driven_universal",
    "read_checkpoint_state": "UniversalSegLib.importers.clip_driven_universal",
    "map_state_dict": "UniversalSegLib.importers.clip_driven_universal",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = list(_LAZY)
