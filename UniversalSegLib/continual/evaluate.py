"""Scores of an extension: new-class Dice on held-out data and retention of the old classes.

Everything is measured on the model grid (the preprocessed image), with sigmoid > the manifest's
threshold and no post-processing, so the figures describe the network itself. Retention of an old
class is the Dice between the extended model's mask and the base model's mask on the same image;
a class neither model finds on an image is left out (no evidence either way). On a retention image
with reference labels (the bundled sample CT), the base model's own Dice against them is recorded
too, so one can tell which old classes the base model segments well in the first place.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from UniversalSegLib.continual.data import ExtensionCase
from UniversalSegLib.continual.pseudo import predict_probabilities
from UniversalSegLib.data import Case, DatasetSpec, LabelMapSource, preprocess_case
from UniversalSegLib.data.adapters import TOTALSEG_NAMES
from UniversalSegLib.errors import InputError
from UniversalSegLib.model import UniversalModel
from UniversalSegLib.registry import Registry
from UniversalSegLib.store import Manifest

SAMPLE = "sample"


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice of two boolean masks; None when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


@dataclass
class EvalImage:
    """A preprocessed image to score on, with reference masks for some classes (keyed by class key)."""

    name: str
    image: np.ndarray
    reference: dict[str, np.ndarray] = field(default_factory=dict)


def _sample_label_values(names_file: Path, keys: Sequence[str]) -> dict[int, str]:
    names = json.loads(Path(names_file).read_text())
    values = {}
    for value, name in names.items():
        key = TOTALSEG_NAMES.get(name, name)
        if key in keys:
            values[int(value)] = key
    return values


def retention_image(spec: str | Path, manifest: Manifest, registry: Registry) -> EvalImage:
    """`"sample"` (the bundled abdomen CT with its reference labels) or a path to any CT."""
    old_keys = manifest.class_keys
    if str(spec) == SAMPLE:
        from UniversalSegLib.resources import SAMPLE_CT, SAMPLE_LABEL_NAMES, SAMPLE_LABELS

        values = _sample_label_values(SAMPLE_LABEL_NAMES, old_keys)
        case = Case(SAMPLE_CT, [LabelMapSource(SAMPLE_LABELS, values)], "sample_ct_abdomen")
        annotated = sorted(set(values.values()))
    else:
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"retention image not found: {path}")
        case, annotated = Case(path, [], path.name), []
    ds = DatasetSpec("retention", [case], annotated)
    image, labels, flags = preprocess_case(case, ds, old_keys, manifest.preprocessing, registry)
    reference = {k: labels[i].astype(bool) for i, k in enumerate(old_keys) if flags[i]}
    return EvalImage(case.case_id, image, reference)


def heldout_image(case: ExtensionCase, new_keys: Sequence[str]) -> EvalImage:
    return EvalImage(case.case_id, case.image,
                     {k: case.labels[i].astype(bool) for i, k in enumerate(new_keys) if case.annotated[i]})


class Predictor:
    """Thresholded masks of one model on eval images, computed once per (image, model)."""

    def __init__(self, patch_size: Sequence[int], overlap: float, threshold: float, device: torch.device,
                 cancelled: Callable[[], bool] | None = None):
        self.patch_size, self.overlap, self.threshold = list(patch_size), overlap, threshold
        self.device, self.cancelled = device, cancelled

    def masks(self, model: UniversalModel, image: EvalImage, classes: Sequence[int]) -> np.ndarray:
        prob = predict_probabilities(model, image.image, list(classes), self.patch_size, self.overlap, self.device,
                                     self.cancelled)
        return prob > round(self.threshold * 255)


def score_image(image: EvalImage, old_keys: Sequence[str], new_keys: Sequence[str], base: np.ndarray,
                variants: dict[str, np.ndarray], new_only: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Per-class figures for one image.

    base: (K_old, ...) base-model masks; variants: name -> (K_old + K_new, ...) masks of an extended
    model ("extended", "naive"); new_only: name -> (K_new, ...) masks scored on the new classes only
    ("warmup": the heads right after the warm-up). Returns {"name", "old": {key: {...}}, "new": {...}}.
    """
    old: dict[str, dict[str, Any]] = {}
    for i, key in enumerate(old_keys):
        row: dict[str, Any] = {"base_voxels": int(base[i].sum())}
        if key in image.reference:
            row["base_dice_vs_reference"] = dice(base[i], image.reference[key])
        for name, masks in variants.items():
            row[f"{name}_retention"] = dice(masks[i], base[i])
        if row["base_voxels"] or any(row[f"{n}_retention"] is not None for n in variants):
            old[key] = row
    new: dict[str, dict[str, Any]] = {}
    for j, key in enumerate(new_keys):
        if key in image.reference:
            new[key] = {"reference_voxels": int(image.reference[key].sum())}
            for name, masks in variants.items():
                new[key][f"{name}_dice"] = dice(masks[len(old_keys) + j], image.reference[key])
            for name, masks in (new_only or {}).items():
                new[key][f"{name}_dice"] = dice(masks[j], image.reference[key])
    return {"name": image.name, "old": old, "new": new}


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarise_retention(scores: dict[str, Any], variants: Sequence[str], min_base_dice: float = 0.8,
                        min_retention: float = 0.9) -> dict[str, Any]:
    """Mean retention per variant, and the acceptance check on classes the base model segments well."""
    old = scores["old"]
    out: dict[str, Any] = {f"{v}_mean_retention": _mean([r[f"{v}_retention"] for r in old.values()])
                           for v in variants}
    good = [k for k, r in old.items() if (r.get("base_dice_vs_reference") or 0) >= min_base_dice]
    if good:
        out["well_segmented_classes"] = good
        for v in variants:
            vals = [old[k][f"{v}_retention"] for k in good]
            out[f"{v}_min_retention_well_segmented"] = min((x for x in vals if x is not None), default=None)
            out[f"{v}_mean_retention_well_segmented"] = _mean(vals)
        ext = out.get("extended_min_retention_well_segmented")
        out[f"all_well_segmented_retained_{min_retention}"] = ext is not None and ext >= min_retention
        if "naive" in variants:
            a, b = out.get("extended_mean_retention_well_segmented"), out.get("naive_mean_retention_well_segmented")
            out["better_than_naive"] = a is not None and b is not None and a > b
    return out
