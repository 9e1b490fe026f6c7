"""NIfTI outputs: one binary mask per class, and one merged multi-label map with its label table.

The merged map cannot hold overlaps, so it paints in a fixed order: organs (and bones, muscles,
other), then vessels, then tumours, each later tier over the earlier ones. Inside a tier, a voxel
claimed by several classes goes to the most confident one (per-voxel probability when the result
kept it, else the class's mean confidence).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from UniversalSegLib.geometry import Slices, array_on_grid, check_masks, grid_shape, mask_parts
from UniversalSegLib.inference.result import ClassResult, SegmentationResult
from UniversalSegLib.io.atomic import atomic_dir, atomic_write
from UniversalSegLib.registry import safe_file_name

# Painting tiers of the merged label map, first painted first (later tiers overwrite).
TIERS: tuple[tuple[str, ...], ...] = (("organ", "bone", "muscle", "other"), ("vessel",), ("tumour",))
_TERM_PARTS = (("Category", "category"), ("Type", "type"), ("TypeModifier", "modifier"), ("Region", "region"),
               ("RegionModifier", "region_modifier"))


def mask_file_name(key: str) -> str:
    """File name of a class's mask inside the masks folder."""
    return f"{safe_file_name(key)}.nii.gz"


def write_class_masks(result: SegmentationResult, folder: str | os.PathLike) -> dict[str, Path]:
    """Write one uint8 0/1 NIfTI per class into `folder` (replaced as a whole, atomically); returns key -> file."""
    check_masks(result)
    folder = Path(folder)
    shape = grid_shape(result.reference)
    with atomic_dir(folder) as tmp:
        for c in result.classes:
            slices, crop = mask_parts(c)
            mask = np.zeros(shape, dtype=np.uint8)
            mask[slices] = crop
            sitk.WriteImage(array_on_grid(mask, result.reference), str(tmp / mask_file_name(c.info.key)),
                            useCompression=True)
    return {c.info.key: folder / mask_file_name(c.info.key) for c in result.classes}


def _candidates(c: ClassResult, slices: Slices, crop: np.ndarray) -> np.ndarray:
    """Confidence 1..256 of the class inside its bounding box, 0 where the mask is off ("no claim")."""
    if c.probability is not None:
        confidence = c.probability[slices].astype(np.uint16) + 1
    else:
        confidence = np.full(crop.shape, round(255 * c.mean_confidence) + 1, dtype=np.uint16)
    confidence[~crop] = 0
    return confidence


def merge_label_map(result: SegmentationResult) -> np.ndarray:
    """The merged label map as a (z, y, x) array; class i of `result.classes` has label value i + 1."""
    check_masks(result)
    shape = grid_shape(result.reference)
    merged = np.zeros(shape, dtype=np.uint8 if len(result.classes) < 256 else np.uint16)
    for groups in TIERS:
        # np.zeros is lazily allocated: only pages under this tier's masks are ever touched.
        best = np.zeros(shape, dtype=np.uint16)
        for value, c in enumerate(result.classes, start=1):
            if c.info.group not in groups:
                continue
            slices, crop = mask_parts(c)
            candidates = _candidates(c, slices, crop)
            # Beats earlier tiers (best is 0 there) and less confident classes of this tier; ties keep the first.
            wins = candidates > best[slices]
            best[slices][wins] = candidates[wins]
            merged[slices][wins] = value
    return merged


def _label_files(path: Path) -> tuple[Path, Path]:
    base = path.name.removesuffix(".gz").removesuffix(".nii")
    return path.with_name(f"{base}.labels.json"), path.with_name(f"{base}-colors.csv")


def _label_entries(result: SegmentationResult) -> list[dict]:
    return [{"value": value, "key": c.info.key, "name": c.info.name, "group": c.info.group,
             "color": list(c.info.color), "terminology": c.info.terminology}
            for value, c in enumerate(result.classes, start=1)]


def _write_color_table(entries: list[dict], path: Path) -> None:
    """A Slicer colour table (.csv): label value, name, 0-255 RGBA and the DICOM terminology columns."""
    header = ["LabelValue", "Name", "Color_R", "Color_G", "Color_B", "Color_A"]
    header += [f"{part}_{field}" for part, _ in _TERM_PARTS for field in ("CodingScheme", "CodeValue", "CodeMeaning")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for e in entries:
            codes = [v for _, key in _TERM_PARTS for v in (e["terminology"].get(key) or ["", "", ""])]
            writer.writerow([e["value"], e["name"], *e["color"], 255, *codes])


def write_label_map(result: SegmentationResult, path: str | os.PathLike) -> dict[str, Path]:
    """Write the merged label map NIfTI plus `<name>.labels.json` and a Slicer colour table `<name>-colors.csv`.

    Returns {"labelmap": ..., "labels": ..., "colors": ...}.
    """
    path = Path(path)
    labels_path, colors_path = _label_files(path)
    entries = _label_entries(result)
    image = array_on_grid(merge_label_map(result), result.reference)
    table = {"model": result.model_name, "background": 0, "labels": entries,
             "painting_order": [list(groups) for groups in TIERS],
             "note": "later groups overwrite earlier ones; within a group the more confident class wins"}
    with atomic_write(path) as tmp_image, atomic_write(labels_path) as tmp_labels, \
            atomic_write(colors_path) as tmp_colors:
        sitk.WriteImage(image, str(tmp_image), useCompression=True)
        tmp_labels.write_text(json.dumps(table, indent=1), encoding="utf-8")
        _write_color_table(entries, tmp_colors)
    return {"labelmap": path, "labels": labels_path, "colors": colors_path}
