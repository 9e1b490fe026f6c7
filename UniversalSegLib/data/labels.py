"""The papers' label rules, applied when a dataset's labels become a multi-hot training target.

- Inclusion: a structure with registry `parents` (tumours, hepatic vessels) lies inside its host, so
  its voxels also count as the host (liver tumour -> liver; kidney tumour/cyst -> the kidney side
  it lies in).
- Sides: a paired organ annotated without side (a "virtual" key such as "kidney", whose
  "kidney_left"/"kidney_right" are registry classes) is split into the two sides.

All masks must be in RAS orientation: the first array axis increases toward the patient's right,
so the component with the smaller mean first-axis index is the patient's LEFT one (checked against
TotalSegmentator's kidney_left/kidney_right on the sample abdomen CT in the tests).
"""

from __future__ import annotations

from collections.abc import Iterable

import cc3d
import numpy as np
from scipy.ndimage import distance_transform_edt

from UniversalSegLib.components import connected_components
from UniversalSegLib.registry import Registry

SIDES = ("left", "right")


def pair_sides(key: str, registry: Registry) -> tuple[str, str] | None:
    """(left key, right key) when `key` is a side-less paired organ such as "kidney", else None."""
    if key in registry:
        return None
    left, right = f"{key}_left", f"{key}_right"
    return (left, right) if left in registry and right in registry else None


def expand_keys(keys: Iterable[str], registry: Registry) -> list[str]:
    """Registry keys a list of (possibly side-less) keys produces, in order, without duplicates."""
    out: list[str] = []
    for key in keys:
        for k in pair_sides(key, registry) or (key,):
            if k not in out:
                out.append(k)
    return out


def _pair_base(parents: list[str], registry: Registry) -> str | None:
    """"kidney" for parents [kidney_left, kidney_right]; None for a single or unpaired host."""
    if len(parents) != 2 or parents[0] not in registry or registry[parents[0]].pair != parents[1]:
        return None
    base = parents[0].rsplit("_", 1)[0]
    return base if pair_sides(base, registry) else None


def split_left_right(mask: np.ndarray, midline: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split a side-less paired organ into (left, right) masks.

    The two largest 26-connected components decide the sides (smaller mean first-axis index = left);
    other components go to the side their centroid is on, relative to the midpoint of those two. With a
    single component, voxels are split at `midline` (default: the array centre), so one organ lying
    on one side stays whole and a bridged pair is cut at the body midline.
    """
    mask = np.asarray(mask, dtype=bool)
    labels, n = connected_components(mask, connectivity=26, return_N=True)
    if n == 0:
        return np.zeros_like(mask), np.zeros_like(mask)
    if n == 1:
        mid = (mask.shape[0] - 1) / 2 if midline is None else midline
        first = np.arange(mask.shape[0])[:, None, None]
        left = mask & (first < mid)
        return left, mask & ~left
    stats = cc3d.statistics(labels)
    counts, centre = np.asarray(stats["voxel_counts"]), np.asarray(stats["centroids"])[:, 0]
    a, b = (np.argsort(-counts[1:], kind="stable") + 1)[:2]
    mid = (centre[a] + centre[b]) / 2
    is_left = centre < mid
    is_left[0] = False
    left = is_left[labels]
    return left, mask & ~left


def _nearest_side(part: np.ndarray, left: np.ndarray, right: np.ndarray, midline: float | None) -> tuple:
    """Assign each voxel of `part` to the nearer of two side masks (by the midline if one is empty)."""
    if not left.any() or not right.any():
        mid = (part.shape[0] - 1) / 2 if midline is None else midline
        to_left = part & (np.arange(part.shape[0])[:, None, None] < mid)
        return to_left, part & ~to_left
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(part | left | right))
    d_left = distance_transform_edt(~left[box])
    d_right = distance_transform_edt(~right[box])
    to_left = np.zeros_like(part)
    to_left[box] = part[box] & (d_left <= d_right)
    return to_left, part & ~to_left


def apply_label_rules(masks: dict[str, np.ndarray], annotated: Iterable[str], registry: Registry,
                      midline: float | None = None) -> dict[str, np.ndarray]:
    """Apply inclusion then side splitting to per-key boolean masks (keys: registry or side-less keys).

    Hosts only receive voxels when the dataset annotates them (`annotated`: registry keys); side-less
    keys are replaced by their two sides. Returns a new dict of registry keys only.
    """
    annotated = set(annotated)
    masks = {k: np.asarray(v, dtype=bool) for k, v in masks.items()}
    pending: list[tuple[np.ndarray, tuple[str, str]]] = []
    for key in list(masks):
        parents = registry[key].parents if key in registry else []
        base = _pair_base(parents, registry)
        if base is not None:
            sides = pair_sides(base, registry)
            if not annotated & set(sides):
                continue
            if base in masks:  # side-less host (KiTS kidney): include first, split afterwards
                masks[base] = masks[base] | masks[key]
            else:
                pending.append((masks[key], sides))
            continue
        for parent in parents:
            if parent in annotated:
                masks[parent] = masks[key] | masks[parent] if parent in masks else masks[key].copy()
    for base in [k for k in masks if pair_sides(k, registry)]:
        sides = pair_sides(base, registry)
        for side, part in zip(sides, split_left_right(masks.pop(base), midline)):
            masks[side] = masks[side] | part if side in masks else part
    for part, (lk, rk) in pending:
        shape = part.shape
        left, right = masks.get(lk, np.zeros(shape, bool)), masks.get(rk, np.zeros(shape, bool))
        to_left, to_right = _nearest_side(part, left, right, midline)
        masks[lk], masks[rk] = left | to_left, right | to_right
    return {k: v for k, v in masks.items() if k in registry}
