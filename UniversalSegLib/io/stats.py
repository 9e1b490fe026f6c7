"""Per-class statistics: volume, HU mean/std over the mask, confidence (flagged when low), whether the
mask reaches the scan border, and why the plausibility check cut or flagged it (`reason`)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from UniversalSegLib.geometry import Slices, check_masks, mask_parts
from UniversalSegLib.inference.result import SegmentationResult
from UniversalSegLib.io.atomic import atomic_write

COLUMNS = ("key", "name", "group", "voxel_count", "volume_ml", "mean_hu", "std_hu", "mean_confidence",
           "low_confidence", "touches_border", "empty", "reason")
# A mask whose mean probability is below this is flagged: on the bundled model, structures the scan
# shows score 0.95-0.99 on CT, while masks on MR, on structures outside the field of view and on
# anatomy the model confuses score lower (training/default_model/MODEL_CARD.md, "Confidence").
LOW_CONFIDENCE = 0.9


def touches_border(slices: Slices, shape: Sequence[int]) -> bool:
    """True when a non-empty mask's tight bounding box reaches a face of the volume (the structure may be cut off)."""
    return any(s.start == 0 or s.stop == n for s, n in zip(slices, shape))


def compute_statistics(result: SegmentationResult) -> list[dict]:
    """One dict per class (in result order) with the keys of `COLUMNS`; HU values are None for empty masks."""
    check_masks(result)
    hu = sitk.GetArrayViewFromImage(result.reference)
    voxel_ml = float(np.prod(result.reference.GetSpacing())) / 1000.0
    rows = []
    for c in result.classes:
        slices, crop = mask_parts(c)
        values = hu[slices][crop].astype(np.float64)  # only the masked voxels: cost follows the structure's size
        count = int(values.size)
        rows.append({
            "key": c.info.key,
            "name": c.info.name,
            "group": c.info.group,
            "voxel_count": count,
            "volume_ml": count * voxel_ml,
            "mean_hu": float(values.mean()) if count else None,
            "std_hu": float(values.std()) if count else None,
            "mean_confidence": float(c.mean_confidence),
            "low_confidence": bool(count) and float(c.mean_confidence) < LOW_CONFIDENCE,
            "touches_border": touches_border(slices, hu.shape) if count else False,
            "empty": count == 0,
            "reason": getattr(c, "reason", ""),  # inference/plausibility.py; "" when the mask passed
        })
    return rows


def rounded_row(row: dict) -> dict:
    """A statistics row with volume, HU and confidence rounded as the written files show them."""
    digits = {"volume_ml": 3, "mean_hu": 2, "std_hu": 2, "mean_confidence": 4}
    return {k: (round(v, digits[k]) if k in digits and v is not None else v) for k, v in row.items()}


def write_statistics(result: SegmentationResult, csv_path: str | os.PathLike,
                     json_path: str | os.PathLike) -> list[dict]:
    """Write the statistics as CSV (one row per class) and JSON (with image and model context); returns the rows."""
    rows = compute_statistics(result)
    spacing = result.reference.GetSpacing()
    document = {"model": result.model_name, "image_size": list(result.reference.GetSize()),
                "spacing_mm": list(spacing), "voxel_volume_ml": float(np.prod(spacing)) / 1000.0,
                "low_confidence_below": LOW_CONFIDENCE,
                "classes": [rounded_row(r) for r in rows], "metadata": result.metadata}
    with atomic_write(csv_path) as tmp_csv, atomic_write(json_path) as tmp_json:
        with open(tmp_csv, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rounded_row(r) for r in rows)
        Path(tmp_json).write_text(json.dumps(document, indent=1, default=str), encoding="utf-8")
    return rows
