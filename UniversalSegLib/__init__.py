"""UniversalSeg backend: universal CT segmentation with the CLIP-driven Universal Model.

Public API (imported lazily so `import UniversalSegLib` stays cheap):
    predict                                            -- segment a CT (masks on its exact grid)
    predict_many                                       -- segment a cohort, one result per case (resumable)
    load_model, list_models, save_model, create_model  -- model files
    default_registry                                   -- the class registry
"""

from __future__ import annotations

from UniversalSegLib._lazy import lazy_getattr

__version__ = "0.1.0"
# Importing the package changes nothing process-wide: the lean MONAI import (`_lean_monai`) and the
# allocator tuning (`runtime`) are the `universalseg` command's (cli.main), not a library user's.

_LAZY = {
    "load_model": "UniversalSegLib.store",
    "list_models": "UniversalSegLib.store",
    "save_model": "UniversalSegLib.store",
    "create_model": "UniversalSegLib.store",
    "default_registry": "UniversalSegLib.registry",
    "UniversalModel": "UniversalSegLib.model",
    "predict": "UniversalSegLib.inference.predict",
    "predict_many": "UniversalSegLib.cohort.api",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = list(_LAZY)
