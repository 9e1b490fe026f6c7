"""Bring one class's probability from the model grid back onto the input's exact grid.

Linear interpolation with SimpleITK (physical coordinates, so any orientation and spacing map
exactly), then the threshold. Only the part of the input grid that can reach the threshold is
resampled: a linearly interpolated value is a convex combination of its (up to 8) neighbours, so
it can exceed the threshold only within one voxel of a model-grid voxel that does. The box of such
voxels, grown by a safety margin, is mapped to the input grid through its corners; the result is
identical to resampling the whole volume, at a cost that follows the structure's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import cc3d
import numpy as np
import SimpleITK as sitk

from UniversalSegLib.inference.masks import BoxMask, bounding_box
from UniversalSegLib.inference.preprocess import ModelGrid

MARGIN = 2  # model-grid voxels around the above-threshold box (1 is enough; 2 absorbs rounding)
PROBABILITY_FLOOR = 0.5 / 255  # below this a uint8 probability map stores 0


@dataclass
class Restored:
    """One class on the input grid."""

    mask: BoxMask
    mean_confidence: float
    probability: np.ndarray | None  # uint8 (z, y, x) full size, only when asked
    values: np.ndarray | None = None  # uint8 probability of the mask's voxels (C order), only when asked


def _lps_to_index(reference: sitk.Image) -> np.ndarray:
    """4x4 matrix from LPS millimetres to the reference's continuous (x, y, z) index."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.reshape(reference.GetDirection(), (3, 3)) @ np.diag(reference.GetSpacing())
    matrix[:3, 3] = reference.GetOrigin()
    return np.linalg.inv(matrix)


def input_box(grid: ModelGrid, start: np.ndarray, stop: np.ndarray,
              reference: sitk.Image) -> tuple[np.ndarray, np.ndarray] | None:
    """The (x, y, z) index box of the reference covering model-grid voxels [start, stop), or None if outside."""
    corners = np.array([[*c, 1.0] for c in product(*zip(start - 0.5, stop - 0.5))]).T
    index = (_lps_to_index(reference) @ grid.index_to_lps @ corners)[:3]
    size = np.array(reference.GetSize())
    lo = np.maximum(0, np.floor(index.min(axis=1)).astype(int) - 1)
    hi = np.minimum(size, np.ceil(index.max(axis=1)).astype(int) + 2)
    return (lo, hi) if np.all(hi > lo) else None


def to_input_grid(probability: np.ndarray, grid: ModelGrid, reference: sitk.Image, threshold: float,
                  keep_probability: bool = False, largest_only: bool = False, keep_values: bool = False) -> Restored:
    """Resample an (x, y, z) model-grid probability onto `reference`'s grid and threshold it.

    `largest_only` keeps the largest connected component (the mean confidence is then over it);
    `keep_values` also returns the mask voxels' probabilities, for confidences after later rules.
    """
    shape_zyx = tuple(reversed(reference.GetSize()))
    floor = PROBABILITY_FLOOR if keep_probability else threshold
    box = bounding_box(probability > floor)
    empty = Restored(BoxMask.empty(shape_zyx), 0.0, np.zeros(shape_zyx, np.uint8) if keep_probability else None,
                     np.zeros(0, np.uint8) if keep_values else None)
    if box is None:
        return empty
    lo = np.maximum(0, np.array(box[0]) - MARGIN)
    hi = np.minimum(probability.shape, np.array(box[1]) + MARGIN)
    target = input_box(grid, lo, hi, reference)
    if target is None:
        return empty
    t_lo, t_hi = target
    source = grid.sub_image(probability[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], tuple(int(v) for v in lo))
    origin = reference.TransformIndexToPhysicalPoint([int(v) for v in t_lo])
    values = sitk.GetArrayFromImage(sitk.Resample(
        source, [int(v) for v in t_hi - t_lo], sitk.Transform(), sitk.sitkLinear, origin, reference.GetSpacing(),
        reference.GetDirection(), 0.0, sitk.sitkFloat32))  # (z, y, x)
    inside = values > threshold
    if largest_only and inside.any():
        inside = cc3d.largest_k(inside, k=1, connectivity=26) > 0
    inside_values = values[inside]
    mean = float(inside_values.mean(dtype=np.float64)) if inside_values.size else 0.0
    mask = BoxMask(shape_zyx, tuple(int(v) for v in reversed(t_lo)), inside)
    full = None
    if keep_probability:
        full = np.zeros(shape_zyx, np.uint8)
        z, y, x = (slice(int(a), int(b)) for a, b in zip(reversed(t_lo), reversed(t_hi)))
        full[z, y, x] = np.rint(values * 255.0).astype(np.uint8)
    kept = np.rint(inside_values * 255.0).astype(np.uint8) if keep_values else None
    return Restored(mask, mean, full, kept)
