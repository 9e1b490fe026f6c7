"""Chest-over-abdomen composites: one scan's chest stacked above another scan's abdomen.

Why: scan A ends at the liver dome, so no training window ever shows the liver or the spleen with the
heart and lungs above them. Scans that cover the thorax and the upper abdomen (B, C, any chest-abdomen
CT) then lose those organs: with 120 mm of B's chest stacked above A, the v0.3.0 model's Dice fell
from 0.943 to 0.803 (liver) and 0.924 to 0.802 (spleen) (MODEL_CARD.md, "Thorax above"). The
composite puts that context into training with labels that are right everywhere: the abdomen's
classes are absent from a chest block cut well above the heart's lowest slice, and the chest's
classes (heart, pulmonary artery) are absent from an abdomen that ends at the liver dome.

Arrays are (x, y, z) in model space with z toward superior (RAS, see UniversalSegLib.data.fov).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def fit_plane(volume: np.ndarray, size_xy: Sequence[int], centre_xy: Sequence[float], fill: float) -> np.ndarray:
    """Crop or pad the (x, y) plane of an (X, Y, Z) array to `size_xy`.

    A crop is centred on `centre_xy` as far as the array allows (a smaller field of view around
    that point); a pad is symmetric, with `fill`.
    """
    out = volume
    for axis, (n, centre) in enumerate(zip(size_xy, centre_xy)):
        have = out.shape[axis]
        if have >= n:
            start = int(np.clip(round(centre - n / 2), 0, have - n))
            out = np.take(out, np.arange(start, start + n), axis=axis)
        else:
            width = [(0, 0)] * out.ndim
            width[axis] = ((n - have) // 2, n - have - (n - have) // 2)
            out = np.pad(out, width, constant_values=fill)
    return out


def lowest_slice_above(mask: np.ndarray, mm: float, spacing_z: float) -> int:
    """The slice `mm` above the lowest slice of `mask` (the chest block starts there)."""
    slices = np.flatnonzero(mask.any(axis=(0, 1)))
    if slices.size == 0:
        raise ValueError("the anchor mask is empty: cannot place the chest block")
    return int(slices[0] + round(mm / spacing_z))


def stack_above(below: Mapping[str, np.ndarray], above: Mapping[str, np.ndarray], centre_xy: Sequence[float],
                fill: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """`above` (already cut to the block wanted) on top of `below`, in `above`'s plane.

    Both map keys (e.g. "image", "structure_map", class keys) to (X, Y, Z) arrays. `below`'s plane is
    cropped (or padded) to `above`'s around `centre_xy`. A key only one side has is filled with
    `fill[key]` (default 0) on the other: for a class mask that says "absent there", so pass only
    classes that really are absent from the other block.
    """
    fill = dict(fill or {})
    plane = above[next(iter(above))].shape[:2]
    depth = {"below": below[next(iter(below))].shape[2], "above": above[next(iter(above))].shape[2]}
    out = {}
    for key in [*below, *(k for k in above if k not in below)]:
        value = fill.get(key, 0)
        dtype = (below.get(key) if key in below else above[key]).dtype
        low = (fit_plane(below[key], plane, centre_xy, value) if key in below
               else np.full((*plane, depth["below"]), value, dtype))
        high = above[key] if key in above else np.full((*plane, depth["above"]), value, dtype)
        out[key] = np.concatenate([low.astype(dtype), high.astype(dtype)], axis=2)
    return out
