"""Post-processing rules from the registry, applied to the masks on the input grid.

The mask operations; which rule runs when, and what each needs, is declared in `rules.py`.

Rules (`ClassInfo.postprocess`):
- "largest_component": keep the largest 26-connected component (cc3d).
- "split_pair": merge a paired organ with its other side (`ClassInfo.pair`), keep the two largest
  components of the union and, when they lie side by side (their heights overlap), give each to
  the side it lies on (patient left/right, decided in physical LPS coordinates, so any orientation
  of the input works). Two components one above the other are not the pair: each keeps the side
  the model gave it, and a side keeps only its larger one. A pair that touches (the hip bones at
  the symphysis) is one component: each side then keeps its own largest component, swapped only
  if the model put them on the wrong sides.
- "within_parents": keep only the part inside the parent organs (`ClassInfo.parents`) after a
  closing and a dilation of their union by a cube of 5 model-grid voxels (+-3 mm at 1.5 mm).
- Distinct vessels are distinct lumens (`DISJOINT_GROUPS`; a vessel with parents, such as the
  hepatic vessels inside the liver, is exempt): a component of one that lies mostly inside
  another, which is the more probable there, is dropped (`disjoint`). Sigmoid heads can both fire
  on one lumen: the model's left common carotid artery lay wholly inside the inferior vena cava of
  the bundled abdomen (6.8 ml at confidence 0.92). Likewise an organ's component lying mostly
  inside a vessel (`NEVER_IN_A_VESSEL`): the same model's "heart" (38 ml) lay on the left iliac
  vein. Not the other way round: vessels do run inside organs. Runs first, on the predicted masks.

Why on the input grid: the rule then holds for exactly the mask the user gets, and every step
works on the masks' bounding boxes (`BoxMask`), so its cost follows the structures' sizes rather
than the scan's. Rules run in that order (pairs, single organs, then children), so a tumour is
restricted by its organ's final mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cc3d
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from UniversalSegLib.components import connected_components, largest_k
from UniversalSegLib.inference.masks import BoxMask, union_box
from UniversalSegLib.registry import ClassInfo

PARENT_MARGIN_MODEL_VOXELS = 2  # the 5x5x5 cube's half-width, in model-grid voxels
DISJOINT_GROUPS = ("vessel",)  # registry groups whose members never overlap in any public label set
NEVER_IN_A_VESSEL = ("organ",)  # groups never inside a vessel's lumen (a vessel may run inside an organ)
SPARSE_SHARE = 16  # a shared part under 1/16 of the box is gathered (8 bytes a shared voxel: <= 0.5 a box voxel)
SWALLOWED_SHARE = 0.5  # of a component inside another vessel: a duplicate detection, not a shared border
TOUCHING_SHARE = 0.75  # of each side's prediction in one component: a touching pair (room for islands)


def largest_component(mask: BoxMask) -> BoxMask:
    """The largest 26-connected component of `mask`."""
    if not mask:
        return mask
    return BoxMask(mask.shape, mask.start, largest_k(mask.crop(), k=1, connectivity=26) > 0)


def _lps_x(reference: sitk.Image, centroid_zyx: Sequence[float], offset_zyx: Sequence[int]) -> float:
    """Physical LPS x (larger = more to the patient's left) of an array-order position."""
    index_xyz = [float(c + o) for c, o in zip(reversed(centroid_zyx), reversed(offset_zyx))]
    return reference.TransformContinuousIndexToPhysicalPoint(index_xyz)[0]


def _superior_range(reference: sitk.Image, component: np.ndarray, offset_zyx: Sequence[int]) -> tuple[float, float]:
    """Lowest and highest physical LPS z (superior) of the corners of `component`'s bounding box."""
    hit = np.argwhere(component)
    lo, hi = hit.min(axis=0) + np.asarray(offset_zyx), hit.max(axis=0) + np.asarray(offset_zyx)
    corners = [[float(c) for c in reversed(corner)] for corner in np.array(np.meshgrid(*zip(lo, hi))).reshape(3, -1).T]
    zs = [reference.TransformContinuousIndexToPhysicalPoint(corner)[2] for corner in corners]
    return min(zs), max(zs)


def side_by_side(reference: sitk.Image, components: Sequence[np.ndarray], offset_zyx: Sequence[int]) -> bool:
    """Whether two components' superior-inferior extents overlap (as two kidneys' do)."""
    (lo_a, hi_a), (lo_b, hi_b) = (_superior_range(reference, c, offset_zyx) for c in components)
    return lo_a <= hi_b and lo_b <= hi_a


def _by_own_side(components: Sequence[np.ndarray], own_left: np.ndarray,
                 own_right: np.ndarray) -> list[np.ndarray]:
    """[left, right]: each component on the side whose prediction covers more of it; per side the larger."""
    sides: list[np.ndarray] = [np.zeros_like(components[0]), np.zeros_like(components[0])]
    for c in sorted(components, key=np.count_nonzero):  # the larger comes last and wins its side
        sides[0 if np.count_nonzero(c & own_left) >= np.count_nonzero(c & own_right) else 1] = c
    return sides


def _touching(component: np.ndarray, own_left: np.ndarray, own_right: np.ndarray) -> bool:
    """Whether two structures touch: `component` holds most of each side's prediction, and the two
    sides cover different parts of it. Doubled sides (both kidneys predicted as both, one kidney
    perhaps cut small by the field of view) cover the same voxels, and are split by position.
    """
    sizes = [np.count_nonzero(own) for own in (own_left, own_right)]
    if min(sizes) == 0:
        return False
    held = all(np.count_nonzero(component & own) >= TOUCHING_SHARE * n for own, n in zip((own_left, own_right), sizes))
    return held and np.count_nonzero(own_left & own_right) <= (1 - TOUCHING_SHARE) * min(sizes)


def split_pair(left: BoxMask, right: BoxMask, reference: sitk.Image) -> tuple[BoxMask, BoxMask]:
    """Re-assign a paired organ's two largest components by side; returns (left, right).

    Side by side, the one more to the patient's left is left (the model may have swapped or doubled
    the sides). One above the other, or a single component: each goes to the side whose own
    prediction covers more of it. Touching (one component holds most of each side's prediction):
    each side keeps its own largest component; the two swap if the model swapped them.
    """
    box = union_box([left, right])
    if box is None:
        return left, right
    start, stop = box
    own_left, own_right = left.region(start, stop), right.region(start, stop)
    labels = largest_k(own_left | own_right, k=2, connectivity=26)
    components = [labels == n for n in (1, 2) if (labels == n).any()]
    if _touching(components[0], own_left, own_right):
        components = [largest_k(own, k=1, connectivity=26) > 0 for own in (own_left, own_right)]
        if _lps_x(reference, np.argwhere(components[0]).mean(axis=0), start) < _lps_x(
                reference, np.argwhere(components[1]).mean(axis=0), start):
            components.reverse()  # "left" lies more to the patient's right: the model swapped them
    elif len(components) == 1:
        only = components[0]
        left_wins = np.count_nonzero(only & own_left) >= np.count_nonzero(only & own_right)
        components = [only, np.zeros_like(only)] if left_wins else [np.zeros_like(only), only]
    elif side_by_side(reference, components, start):
        xs = [_lps_x(reference, np.argwhere(c).mean(axis=0), start) for c in components]
        if xs[0] < xs[1]:  # the first lies more to the patient's right
            components.reverse()
    else:  # e.g. a kidney and a false island far above it: their relative x says nothing of sides
        components = _by_own_side(components, own_left, own_right)
    shape = left.shape
    return BoxMask(shape, start, components[0]), BoxMask(shape, start, components[1])


def parent_region(parents: Sequence[BoxMask], radius: Sequence[int]) -> tuple[np.ndarray, tuple[int, ...]] | None:
    """Closing then dilation of the parents' union by a box of half-width `radius` (z, y, x voxels).

    Returns the region and its start in the full grid, or None when every parent is empty.
    """
    box = union_box(parents, pad=[2 * r for r in radius])
    if box is None:
        return None
    start, stop = box
    union = np.zeros([b - a for a, b in zip(start, stop)], dtype=np.uint8)
    for p in parents:
        union |= p.region(start, stop)
    size = [2 * r + 1 for r in radius]
    closed = ndimage.minimum_filter(ndimage.maximum_filter(union, size=size, mode="constant"), size=size,
                                    mode="nearest")
    return ndimage.maximum_filter(closed, size=size, mode="constant").astype(bool), start


def within(mask: BoxMask, region: tuple[np.ndarray, tuple[int, ...]] | None) -> BoxMask:
    """`mask` restricted to a region from `parent_region` (empty when there is no region)."""
    if not mask or region is None:
        return BoxMask.empty(mask.shape)
    area, start = region
    stop = [s + n for s, n in zip(start, area.shape)]
    lo = [max(a, b) for a, b in zip(mask.start, start)]
    hi = [min(a, b) for a, b in zip(mask.stop, stop)]
    if any(h <= low for low, h in zip(lo, hi)):
        return BoxMask.empty(mask.shape)
    inner = tuple(slice(low - s, h - s) for low, h, s in zip(lo, hi, start))
    return BoxMask(mask.shape, lo, mask.region(lo, hi) & area[inner])


def parent_radius(reference: sitk.Image, model_spacing: Sequence[float]) -> tuple[int, int, int]:
    """The cube's half-width in input voxels (z, y, x): 2 model voxels in millimetres, at least 1."""
    mm = PARENT_MARGIN_MODEL_VOXELS * float(np.mean(model_spacing))
    return tuple(max(1, round(mm / s)) for s in reversed(reference.GetSpacing()))  # type: ignore[return-value]


ALL_RULES = ("split_pair", "largest_component", "within_parents")


def apply_rules(masks: Mapping[str, BoxMask], classes: Mapping[str, ClassInfo], reference: sitk.Image,
                model_spacing: Sequence[float], rules: Sequence[str] = ALL_RULES) -> dict[str, BoxMask]:
    """The classes' `rules` on `masks` (keyed by class key); returns the new masks.

    A pair is split only when both sides are present; otherwise its side keeps its largest
    component. A child whose parents are all absent from `masks` is left as predicted.
    """
    out = dict(masks)
    for key, info in classes.items():
        if "split_pair" not in rules or info.postprocess != "split_pair" or key not in out:
            continue
        if info.pair in out and info.laterality in ("left", "right"):
            if info.laterality == "left":
                out[key], out[info.pair] = split_pair(out[key], out[info.pair], reference)
        else:
            out[key] = largest_component(out[key])
    for key, info in classes.items():
        if "largest_component" in rules and info.postprocess == "largest_component" and key in out:
            out[key] = largest_component(out[key])
    radius = parent_radius(reference, model_spacing)
    for key, info in classes.items():
        present = [out[p] for p in info.parents if p in out]
        if "within_parents" in rules and info.postprocess == "within_parents" and key in out and present:
            out[key] = within(out[key], parent_region(present, radius))
    return out


def disjoint_keys(classes: Sequence[ClassInfo]) -> list[str]:
    """Keys of the classes that `disjoint` separates: members of `DISJOINT_GROUPS` without parents."""
    return [c.key for c in classes if c.group in DISJOINT_GROUPS and not c.parents]


def outside_vessel_keys(classes: Sequence[ClassInfo]) -> list[str]:
    """Keys of the classes `disjoint` removes from vessels: members of `NEVER_IN_A_VESSEL` without parents."""
    return [c.key for c in classes if c.group in NEVER_IN_A_VESSEL and not c.parents]


def _voxel_counts(labels: np.ndarray, n: int) -> np.ndarray:
    """Voxels per label 0..n (cc3d counts in place; `np.bincount` would copy `labels` as int64)."""
    if labels.size <= n:  # cc3d refuses a label as large as the voxel count (a tiny box of a fragmented mask)
        return np.bincount(labels.ravel(), minlength=n + 1)[: n + 1]
    counts = cc3d.statistics(labels, no_slice_conversion=True)["voxel_counts"]
    return np.pad(counts, (0, n + 1 - len(counts)))


def _label_sums(labels: np.ndarray, where: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Sum of `values` over the `where` voxels, per label 0..n (three arrays of one box shape).

    A few planes at a time: `np.bincount` wants 1D labels and widens its weights to float64, which
    for the whole box would add 12 bytes a voxel at once. Sums of uint8 values are exact in float64.
    """
    sums = np.zeros(n + 1)
    step = max(1, (1 << 16) // max(1, labels[0].size))
    for s in range(0, len(labels), step):
        here = where[s:s + step]
        sums += np.bincount(labels[s:s + step][here], weights=values[s:s + step][here], minlength=n + 1)
    return sums


def _shared_sums(values: np.ndarray, labels: np.ndarray, shared: np.ndarray, picked: np.ndarray | None,
                 n: int) -> np.ndarray:
    """Sum of `values` per label 0..n over the `shared` voxels; `picked`: those voxels' labels when
    gathered (a sparse shared part), else None (summed from the box a few planes at a time)."""
    if picked is not None:
        return np.bincount(picked, weights=values[shared], minlength=n + 1)
    return _label_sums(labels, shared, values, n)


def _without_swallowed(mask: BoxMask, own: tuple[BoxMask, np.ndarray] | float,
                       others: Sequence[tuple[BoxMask, np.ndarray]]) -> BoxMask:
    """`mask` less its components that lie mostly (`SWALLOWED_SHARE`) inside the predicted mask of
    one of `others`, where that one is the more probable of the two on the shared voxels.

    `own` and each of `others` are (predicted mask, uint8 values of its voxels); `mask` is `own[0]`
    or part of it. `own` may instead be the class's mean probability (organs keep no voxel values:
    they are large). Linear in the voxels whatever the mask looks like: the components are labelled
    once, and per other mask every component's overlap and probability sums come from one
    `np.bincount` over the shared voxels' labels (a loop comparing the whole box per component was
    quadratic: hours on a fragmented clinical-size mask). Removing whole components leaves the
    others' components unchanged, so one labelling serves every other mask in turn. Probabilities
    are read only where some component lies mostly inside the other mask.
    """
    crop, labels, n, alive, mine = mask.crop(), None, 0, None, None
    for other, other_values in others:
        if not mask.overlaps(other):
            continue
        lo = [max(a, b) for a, b in zip(mask.start, other.start)]  # work on the two boxes' intersection
        hi = [min(a, b) for a, b in zip(mask.stop, other.stop)]
        inner = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, mask.start))
        shared = other.region(lo, hi)
        shared &= crop[inner]
        if not shared.any():
            continue
        if labels is None:  # labelled once, at the first overlap
            labels, n = connected_components(crop, connectivity=26, return_N=True)
            size = _voxel_counts(labels, n)
            alive = np.ones(n + 1, dtype=bool)
            alive[0] = False  # background
        local = labels[inner]
        sparse = np.count_nonzero(shared) * SPARSE_SHARE <= shared.size  # speckle: gather the shared voxels
        picked = local[shared] if sparse else None
        overlap = (np.bincount(picked, minlength=n + 1) if sparse
                   else _voxel_counts(np.where(shared, local, 0), n))  # counted in place: no int64 copy
        candidates = alive & (overlap >= SWALLOWED_SHARE * size)
        if not candidates[1:].any():
            continue
        if not sparse:
            shared &= candidates[local]  # only the candidates' shared voxels are summed
        theirs = _shared_sums(other.region(lo, hi, other_values), local, shared, picked, n)
        if isinstance(own, tuple):
            if mine is None:
                mine = own[0].region(mask.start, mask.stop, own[1])
            own_sums = _shared_sums(mine[inner], local, shared, picked, n)
        else:
            own_sums = own * 255 * overlap
        alive &= ~(candidates & (theirs > own_sums))
    if alive is None or alive[1:].all():
        return mask
    return BoxMask(mask.shape, mask.start, alive[labels])


def disjoint(masks: Mapping[str, BoxMask], values: Mapping[str, np.ndarray], keys: Sequence[str],
             outside: Mapping[str, float] | None = None) -> dict[str, BoxMask]:
    """`masks` without the components of any of `keys` (vessels) that lie mostly inside another of
    `keys` where that one is more probable: one lumen, two vessel heads firing, the weaker one goes.
    Components of the `outside` classes (organs; key -> mean probability) that lie mostly inside a
    vessel more probable there than the organ's mean go too: no organ lies in a vessel's lumen.

    `values[k]` holds the uint8 probabilities of `masks[k]`'s voxels (C order). Borders two vessels
    share are left alone: cutting them by probability cost the left iliac vein of scan A 0.05 Dice.
    Each class is compared with the others' predicted masks (not with what is left of them).
    """
    out = dict(masks)
    for a in keys:
        others = [(masks[b], values[b]) for b in keys if b != a]
        out[a] = _without_swallowed(masks[a], (masks[a], values[a]), others)
    for a, mean in (outside or {}).items():
        out[a] = _without_swallowed(masks[a], mean, [(masks[b], values[b]) for b in keys])
    return out


def mean_within(final: BoxMask, sources: Sequence[tuple[BoxMask, np.ndarray]]) -> float:
    """Mean probability over `final`'s voxels, read from predicted masks and their voxels' uint8 values.

    Each source is (predicted mask, uint8 values of its voxels in C order); a voxel takes its value
    from the first source holding it (a side's own prediction before its pair's).
    """
    if not final:
        return 0.0
    remaining = final.crop()
    total, count = 0.0, 0
    for predicted, values in sources:
        lo = [max(a, b) for a, b in zip(final.start, predicted.start)]
        hi = [min(a, b) for a, b in zip(final.stop, predicted.stop)]
        if not predicted or any(h <= low for low, h in zip(lo, hi)):
            continue
        own = predicted.crop()
        in_final = tuple(slice(low - s, h - s) for low, h, s in zip(lo, hi, final.start))
        in_own = tuple(slice(low - s, h - s) for low, h, s in zip(lo, hi, predicted.start))
        take = np.zeros_like(own)
        take[in_own] = remaining[in_final] & own[in_own]
        picked = values[take[own]]
        total += float(picked.sum(dtype=np.float64))
        count += picked.size
        remaining[in_final] &= ~own[in_own]
    return total / count / 255.0 if count else 0.0
