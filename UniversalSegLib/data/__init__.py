"""Training data: dataset specs and adapters for public layouts, the preprocessing cache, patch
sampling and augmentation.

Names are imported lazily, so a cache worker process that needs only `data.cache` does not import
MONAI and the models.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Case": "spec", "DatasetSpec": "spec", "LabelMapSource": "spec", "LabelSource": "spec", "MaskSource": "spec",
    "load_dataset_file": "spec", "load_dataset_specs": "spec", "resolve_label_key": "spec",
    "apply_label_rules": "labels", "split_left_right": "labels",
    "CachedCase": "cache", "PreprocessedCache": "cache", "preprocess_case": "cache",
    "PatchDataset": "loader", "ValidationCases": "loader", "build_training_dataset": "loader",
    "build_validation_cases": "loader", "case_probabilities": "loader",
    "training_transforms": "transforms",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"UniversalSegLib.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'UniversalSegLib.data' has no attribute {name!r}")


__all__ = list(_LAZY)
