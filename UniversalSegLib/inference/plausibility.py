"""Anatomical plausibility: a model-independent check of where each final mask lies (issue 25).

A sigmoid head can be confidently wrong: the bundled model put a 36 ml "aorta" at 0.91 in the
muscle of an arm lying beside the abdomen. No threshold on confidence catches that; anatomy does.
Each registry class says where it may lie (`ClassInfo.location`, documented in
`registry/classes.py`); this module builds the scan's body frame once and checks each mask:

- "trunk": a connected component lying mostly (`LIMB_SHARE`) in a limb is removed. The limbs are
  the parts of the body that are not trunk: per axial slice, the body (all but the air connected
  to the slice's border, so lungs cut by a small field of view stay body) eroded by
  `TRUNK_CORE_MM` splits into cores; the trunk is every core at least `CORE_SHARE` of the slice's
  largest (two thighs are both kept; an arm, about a tenth of the trunk's core, is not), grown
  back into the body. Air outside the body is not judged.
- "lateral": the mask's centroid must lie within [lo, hi] of the body midline, as a fraction of
  the trunk's half-width (positive toward the patient's left). The midline is the spine's (the
  vertebra, sacrum or spinal cord masks when computed, else bone above 200 HU near the trunk's
  middle), else the trunk's centre.
- "caudal_to": the mask's centroid must lie below those of the listed classes when both are present;
  of an inverted pair the less confident mask is flagged (both when equally confident), so a
  correct vertebra is not flagged for a small false one above it.

A removed component is named in the class's `reason`; a violated position rule keeps the mask,
halves its confidence (so the statistics flag it) and says why. Only "trunk" removes voxels: it is
the one rule that does not depend on the scan's coverage or the patient's size.

Before the model runs, `blank_limbs` sets the arms beside the trunk to air in the model's input
(same limb finder: limb cores lying left or right of the trunk, grown back to the skin), so its
context and body crop are those of a scan without arms; skipped when a class may lie in a limb.
The finder's result depends on the image alone (`Trunk`): `predict` finds it once for the
blanking and the checks of the masks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import cc3d
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from UniversalSegLib.components import connected_components
from UniversalSegLib.inference.masks import BoxMask
from UniversalSegLib.registry import ClassInfo
from UniversalSegLib.registry.location import effective_location

OUTSIDE_AIR_HU = -900.0  # air around the patient (lung is about -850; an arm's air gap of 3 mm is below it)
BONE_HU = 200.0
TRUNK_CORE_MM = 20.0  # an arm's neck where it touches the trunk is narrower than twice this
CORE_SHARE = 0.3  # an arm's core is ~0.1 of the trunk's in the same slice; a thigh's ~1 of the other's
TRUNK_MARGIN_MM = 5.0
LIMB_MARGIN_MM = 6.0  # a blanked limb reaches this far past its skin: partial volume, the coarse grid's step
LIMB_SHARE = 0.5  # of a component in a limb: it is removed
COARSE_MM = 3.0  # the frame is built on an in-plane grid no finer than this (coarse anatomy; fast)
IMPLAUSIBLE_CONFIDENCE_FACTOR = 0.5  # a mask in an implausible position keeps half its confidence
BLANK_HU = -1000.0  # air: what the model sees where a limb was
SPINE_PREFIXES = ("vertebrae_", "sacrum", "spinal_cord")
SPINE_CONFIDENCE = 0.9  # the statistics' low-confidence flag (io/stats.py)


@dataclass(frozen=True)
class Location:
    """Where a class may lie (`ClassInfo.location`); see the module docstring for each rule."""

    trunk: bool = True
    lateral: tuple[float, float] | None = None
    caudal_to: tuple[str, ...] = ()

    @classmethod
    def of(cls, info: ClassInfo) -> Location:
        """The class's own location, else the default registry's for its key, else "trunk" alone
        (`registry.location.effective_location`; a class added to a model stores its own)."""
        data = effective_location(info)
        lateral = data.get("lateral")
        return cls(trunk=bool(data.get("trunk", True)), lateral=tuple(lateral) if lateral else None,
                   caudal_to=tuple(data.get("caudal_to", ())))


@dataclass
class BodyFrame:
    """The scan's anatomy, in an axial frame: array axes (superior-inferior, antero-posterior,
    left-right) of the input array permuted by `axes`.

    `limbs`: body voxels that are not trunk (bool, in the input's array order). `midline` and
    `half_width`: per axial slice, the midline's left-right index and the trunk's half-width in
    voxels (nan where the slice holds no trunk). `left_sign`: +1 when a growing left-right index
    goes to the patient's left. `superior_sign` likewise along the first axis.
    """

    axes: tuple[int, int, int]
    limbs: np.ndarray
    midline: np.ndarray
    half_width: np.ndarray
    left_sign: int
    superior_sign: int
    spacing: tuple[float, float, float]  # mm along the frame's axes


@dataclass
class Outcome:
    """What `check` did: the new masks and confidences, and a reason per changed or flagged class."""

    masks: dict[str, BoxMask]
    confidence: dict[str, float]
    reasons: dict[str, str] = field(default_factory=dict)


def _axes(reference: sitk.Image) -> tuple[tuple[int, int, int], int, int, int]:
    """Array axes of (SI, AP, LR), and the signs of LR (left), AP (posterior), SI (superior) indices."""
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)  # [physical LPS, image index]
    physical_of_index = [int(np.argmax(np.abs(direction[:, i]))) for i in range(3)]
    if sorted(physical_of_index) != [0, 1, 2]:
        physical_of_index = [0, 1, 2]  # strongly oblique: take the array as it is
    index_of = {p: i for i, p in enumerate(physical_of_index)}
    axes = tuple(2 - index_of[p] for p in (2, 1, 0))  # array axis = 2 - image index
    signs = [int(np.sign(direction[p, index_of[p]])) or 1 for p in (0, 1, 2)]
    return axes, signs[0], signs[1], signs[2]  # type: ignore[return-value]


def _body_slice(hu: np.ndarray) -> np.ndarray:
    """One axial slice's body: everything but the air that reaches the slice's border."""
    air = hu < OUTSIDE_AIR_HU  # unsmoothed: smoothing fills the thin air wedge beside a touching arm
    labels = cc3d.connected_components(air, connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return ~np.isin(labels, border[border > 0])


def _cores_slice(body: np.ndarray, spacing_yx: tuple[float, float]) -> tuple[np.ndarray, np.ndarray] | None:
    """(trunk cores, limb cores) of one axial body slice: the body eroded by `TRUNK_CORE_MM` splits
    into cores; those of at least `CORE_SHARE` of the largest are the trunk's, the others limbs'.
    None where the body has no core (empty, or thin: a slab's edge, the table)."""
    if not body.any():
        return None
    depth = ndimage.distance_transform_edt(body, sampling=spacing_yx)
    labels, n = cc3d.connected_components(depth > TRUNK_CORE_MM, connectivity=8, return_N=True)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    trunk = np.isin(labels, np.flatnonzero(sizes >= CORE_SHARE * sizes.max()) + 1)
    return trunk, (labels > 0) & ~trunk


def _within(cores: np.ndarray, spacing_yx: tuple[float, float], mm: float) -> np.ndarray:
    """The voxels of a slice within `mm` of `cores`."""
    return ndimage.distance_transform_edt(~cores, sampling=spacing_yx) <= mm


def _axial(reference: sitk.Image) -> tuple[tuple[int, int, int], tuple[float, float, float], np.ndarray,
                                           list[int], np.ndarray, tuple[float, float]]:
    """(axes, spacing along them, the HU array in the axial frame, in-plane step of the coarse grid,
    the coarse HU array, its in-plane spacing) of `reference`; the frame as in `BodyFrame`."""
    axes = _axes(reference)[0]
    spacing_xyz = reference.GetSpacing()
    spacing = tuple(float(spacing_xyz[2 - a]) for a in axes)
    hu = sitk.GetArrayViewFromImage(reference).transpose(axes)
    step = [max(1, int(COARSE_MM // s)) for s in spacing[1:]]  # in-plane only: slices stay exact
    coarse = hu[:, ::step[0], ::step[1]]
    return axes, spacing, hu, step, coarse, (spacing[1] * step[0], spacing[2] * step[1])  # type: ignore[return-value]


class Trunk:
    """The limb finder's result on one image, per axial slice of the coarse in-plane grid (`_axial`):
    the body, its trunk and limb cores (`_cores_slice`), the trunk, and the limbs on the full grid.

    It depends on the image alone (no mask, no class), so one `Trunk` serves every use on the same
    image: `predict` blanks the arms in the model's input (`limbs_to_blank`) and checks the masks
    (`without_limbs`, `check`) on the same input image, and the finder (0.03-0.4 s a run on A, B, C and a
    clinical grid) then runs once instead of three times. Each part is found on first use.

    Args:
        image: the CT in HU.
    """

    def __init__(self, image: sitk.Image):
        self.image = image

    @cached_property
    def cores(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(body, trunk cores, limb cores), bool (SI, AP, LR) on the coarse grid; no core where a
        slice's body has none."""
        coarse, spacing_yx = _axial(self.image)[4:]
        body = np.zeros(coarse.shape, dtype=bool)
        trunk_cores, limb_cores = np.zeros_like(body), np.zeros_like(body)
        for z in range(body.shape[0]):
            body[z] = _body_slice(coarse[z])
            cores = _cores_slice(body[z], spacing_yx)
            if cores is not None:
                trunk_cores[z], limb_cores[z] = cores
        return body, trunk_cores, limb_cores

    @cached_property
    def near_trunk(self) -> np.ndarray:
        """Within `TRUNK_CORE_MM` + `TRUNK_MARGIN_MM` of the trunk's cores, per coarse slice; the whole
        slice where the body has no core (nothing to tell apart: all of it is trunk)."""
        spacing_yx = _axial(self.image)[5]
        body, trunk_cores, _ = self.cores
        near = np.ones_like(body)
        for z in np.flatnonzero(trunk_cores.any(axis=(1, 2))):
            near[z] = _within(trunk_cores[z], spacing_yx, TRUNK_CORE_MM + TRUNK_MARGIN_MM)
        return near

    @cached_property
    def trunk(self) -> np.ndarray:
        """The trunk on the coarse grid: the body within reach of its trunk cores (`near_trunk`)."""
        return self.cores[0] & self.near_trunk

    @cached_property
    def limbs(self) -> np.ndarray:
        """Body voxels that are not trunk, bool on the full grid in the input's array order."""
        axes, _, hu, step = _axial(self.image)[:4]
        limbs = _full(self.cores[0] & ~self.trunk, step, hu.shape)
        return limbs.transpose(tuple(int(i) for i in np.argsort(axes)))


def _trunk_of(reference: sitk.Image, trunk: Trunk | None) -> Trunk:
    """`trunk` when given (found on `reference` itself), else a new one of `reference`."""
    if trunk is None:
        return Trunk(reference)
    if trunk.image is not reference:
        raise ValueError("a Trunk found on another image than the one checked")
    return trunk


def _full(coarse: np.ndarray, step: list[int], shape: tuple[int, ...]) -> np.ndarray:
    """A coarse in-plane array repeated back onto the full grid of `shape`."""
    return np.repeat(np.repeat(coarse, step[0], axis=1), step[1], axis=2)[:, :shape[1], :shape[2]]


def body_frame(reference: sitk.Image, spine: np.ndarray | None = None, trunk_found: Trunk | None = None
               ) -> BodyFrame:
    """The scan's body frame (see `BodyFrame`).

    Args:
        reference: the CT in HU.
        spine: optional bool (z, y, x) in the input's array order: the vertebrae, sacrum and spinal
            cord masks; without it the midline comes from bone HU.
        trunk_found: the limb finder's result on `reference` (`Trunk`), else found here. Only the
            midline depends on `spine`.
    """
    _, left_sign, _posterior_sign, superior_sign = _axes(reference)
    axes, spacing, hu, step = _axial(reference)[:4]
    trunk_found = _trunk_of(reference, trunk_found)
    trunk = trunk_found.trunk
    columns = np.arange(trunk.shape[2]) * step[1] + (step[1] - 1) / 2
    half_width = np.full(trunk.shape[0], np.nan)
    centre = np.full(trunk.shape[0], np.nan)
    for z in range(trunk.shape[0]):
        xs = np.flatnonzero(trunk[z].any(axis=0))
        if xs.size:
            half_width[z] = (columns[xs[-1]] - columns[xs[0]] + step[1]) / 2
            centre[z] = (columns[xs[-1]] + columns[xs[0]]) / 2
    midline = _midline(hu, trunk, step, spine.transpose(axes) if spine is not None else None, centre)
    return BodyFrame(axes, trunk_found.limbs, midline, half_width, left_sign, superior_sign, spacing)


def _midline(hu: np.ndarray, trunk_coarse: np.ndarray, step: list[int], spine: np.ndarray | None,
             centre: np.ndarray) -> np.ndarray:
    """Per axial slice, the spine's left-right index (interpolated over slices without it), else `centre`."""
    spine_x = np.full(hu.shape[0], np.nan)
    for z in range(hu.shape[0]):
        if spine is not None and spine[z].any():
            spine_x[z] = np.nonzero(spine[z])[1].mean()
        elif spine is None and not np.isnan(centre[z]):
            # bone near the trunk's middle third: the vertebral column (ribs and pelvis lie lateral)
            width = np.flatnonzero(trunk_coarse[z].any(axis=0))
            lo, hi = (width[0] * step[1], (width[-1] + 1) * step[1])
            third = (hi - lo) / 3
            band = hu[z, :, int(lo + third):int(hi - third)] > BONE_HU
            if band.sum() > 20:
                spine_x[z] = np.nonzero(band)[1].mean() + int(lo + third)
    known = np.flatnonzero(~np.isnan(spine_x))
    if known.size == 0:
        return centre
    filled = np.interp(np.arange(hu.shape[0]), known, spine_x[known])
    return np.where(np.isnan(centre), np.nan, filled)


def _centroid_frame(mask: BoxMask, axes: tuple[int, int, int]) -> np.ndarray:
    """A mask's centroid in the frame's axes (SI, AP, LR index)."""
    centroid = np.argwhere(mask.crop()).mean(axis=0) + np.asarray(mask.start)
    return centroid[list(axes)]


def _without_limbs(mask: BoxMask, limbs: np.ndarray, voxel_ml: float, kept_by_rule: int | None = None
                   ) -> tuple[BoxMask, float]:
    """`mask` less its components lying mostly in `limbs` (`Trunk.limbs`), and the millilitres removed
    that matter.

    `kept_by_rule`: how many of the largest components the class's rule keeps (1, 2 for a pair,
    whose sides each end with their largest), or None (all). A removed component smaller than the
    largest kept one would have lost to it anyway: removed but not counted, so a correct structure
    is not reported for the model's speck in an arm.
    """
    in_limb = limbs[tuple(slice(a, b) for a, b in zip(mask.start, mask.stop))]
    crop = mask.crop()
    if not (crop & in_limb).any():
        return mask, 0.0
    labels, n = connected_components(crop, connectivity=26, return_N=True)
    inside = np.bincount(labels[in_limb & crop].ravel(), minlength=n + 1)
    size = np.bincount(labels.ravel(), minlength=n + 1)
    drop = np.flatnonzero(inside[1:] > LIMB_SHARE * size[1:]) + 1
    if drop.size == 0:
        return mask, 0.0
    kept = np.sort(np.delete(size[1:], drop - 1))[::-1]
    bar = kept[0] if kept_by_rule and len(kept) else 0
    removed = float(size[drop][size[drop] >= bar].sum()) * voxel_ml
    return BoxMask(mask.shape, mask.start, crop & ~np.isin(labels, drop)), removed


def _lateral(centroid: np.ndarray, frame: BodyFrame) -> float | None:
    """Signed distance of a centroid from the midline (patient left positive), in trunk half-widths."""
    z = int(np.clip(round(centroid[0]), 0, len(frame.midline) - 1))
    if np.isnan(frame.midline[z]) or np.isnan(frame.half_width[z]) or frame.half_width[z] <= 0:
        return None
    return float(frame.left_sign * (centroid[2] - frame.midline[z]) / frame.half_width[z])


def spine_mask(masks: Mapping[str, BoxMask], confidence: Mapping[str, float] | None = None) -> np.ndarray | None:
    """The union of the vertebra, sacrum and spinal cord masks (input array order), or None.

    With `confidence`, only masks at `SPINE_CONFIDENCE` or above: on chest scan B the model's
    unsure "L1-L5" blobs lie beside the spine and would pull the midline off it.
    """
    parts = [m for k, m in masks.items() if k.startswith(SPINE_PREFIXES) and m
             and (confidence is None or confidence.get(k, 0.0) >= SPINE_CONFIDENCE)]
    if not parts:
        return None
    union = np.zeros(parts[0].shape, dtype=bool)
    for m in parts:
        union[tuple(slice(a, b) for a, b in zip(m.start, m.stop))] |= m.crop()
    return union


def _kept_by_rule(info: ClassInfo) -> int | None:
    """Components the class's post-processing rule keeps (None: all)."""
    return {"largest_component": 1, "split_pair": 2}.get(info.postprocess or "")


def without_limbs(masks: Mapping[str, BoxMask], classes: Mapping[str, ClassInfo],
                  reference: sitk.Image, trunk: Trunk | None = None) -> tuple[dict[str, BoxMask], dict[str, str]]:
    """`masks` less their components lying mostly in a limb (classes with the "trunk" rule), and the
    reasons. Run before the rules that keep the largest component, so an arm's component cannot
    win over the real structure.

    Args:
        masks: predicted masks by class key, on `reference`'s grid.
        classes: the classes by key.
        reference: the CT in HU.
        trunk: the limb finder's result on `reference` (`Trunk`), else found here.
    """
    out, reasons = dict(masks), {}
    keys = [k for k, info in classes.items() if k in masks and masks[k] and Location.of(info).trunk]
    if not keys:
        return out, reasons
    limbs = _trunk_of(reference, trunk).limbs
    voxel_ml = float(np.prod(reference.GetSpacing())) / 1000.0
    for key in keys:
        kept, removed = _without_limbs(out[key], limbs, voxel_ml, _kept_by_rule(classes[key]))
        out[key] = kept
        if removed:
            reasons[key] = f"removed {removed:.1f} ml outside the trunk (in an arm or limb)"
    return out, reasons


def check(masks: Mapping[str, BoxMask], confidence: Mapping[str, float], classes: Mapping[str, ClassInfo],
          reference: sitk.Image, frame: BodyFrame | None = None, trunk: Trunk | None = None) -> Outcome:
    """Apply each class's `Location` to its final mask (see the module docstring).

    Args:
        masks: final masks by class key, on `reference`'s grid.
        confidence: mean probability per class key.
        classes: the classes by key (their `location`, else the default registry's).
        reference: the CT in HU.
        frame: a precomputed `body_frame` (default: built from `reference` and the spine masks).
        trunk: the limb finder's result on `reference` (`Trunk`) for the frame built here, else found here.
    """
    out = Outcome(dict(masks), dict(confidence))
    rules = {key: Location.of(info) for key, info in classes.items() if key in masks and masks[key]}
    if not any(r.trunk or r.lateral or r.caudal_to for r in rules.values()):
        return out  # nothing to check: no body frame to build
    frame = frame or body_frame(reference, spine_mask(masks, confidence), trunk)
    voxel_ml = float(np.prod(reference.GetSpacing())) / 1000.0
    for key, rule in rules.items():
        if rule.trunk:
            kept, removed = _without_limbs(out.masks[key], frame.limbs, voxel_ml)
            if removed:
                out.masks[key] = kept
                out.reasons[key] = f"removed {removed:.1f} ml outside the trunk (in an arm or limb)"
                if not kept:
                    out.confidence[key] = 0.0
    centroids = {k: _centroid_frame(m, frame.axes) for k, m in out.masks.items() if m}
    problems: dict[str, list[str]] = {}
    for key, rule in rules.items():
        if key not in centroids:
            continue
        if rule.lateral is not None:
            offset = _lateral(centroids[key], frame)
            lo, hi = rule.lateral
            if offset is not None and not lo <= offset <= hi:
                side = "left" if offset > 0 else "right"
                problems.setdefault(key, []).append(f"lies {abs(offset):.2f} trunk half-widths {side} of the midline "
                                f"(expected {lo:+.2f} to {hi:+.2f})")
        for other in rule.caudal_to:  # of an inverted pair the less confident is suspect (both if equal)
            if other in centroids and frame.superior_sign * (centroids[key][0] - centroids[other][0]) > 0:
                if out.confidence[key] <= out.confidence[other]:
                    problems.setdefault(key, []).append(f"lies above {other}")
                if out.confidence[other] <= out.confidence[key]:
                    problems.setdefault(other, []).append(f"lies below {key}")
    for key, found in problems.items():
        out.confidence[key] = out.confidence[key] * IMPLAUSIBLE_CONFIDENCE_FACTOR
        note = "implausible position: " + "; ".join(found)
        out.reasons[key] = f"{out.reasons[key]}; {note}" if key in out.reasons else note
    return out


def limbs_to_blank(reference: sitk.Image, trunk: Trunk | None = None) -> np.ndarray:
    """The limbs of `reference` as the model should not see them: bool, in the input's array order.

    Per axial slice, each limb core (`_cores_slice`) lying beside the trunk (`_beside`) grown back
    to its skin and `LIMB_MARGIN_MM` beyond (partial-volume edges, the coarse grid's step), where
    it is at least as near as the trunk's cores, and never the trunk's cores grown by
    `TRUNK_CORE_MM` (its body to the skin). A touching arm is then blanked to the contact, so the
    body crop is the trunk's. Thin parts without a core (the table, air specks) are never limbs
    here. Empty on scans A, B and C.

    Args:
        reference: the CT in HU.
        trunk: the limb finder's result on `reference` (`Trunk`), else found here.
    """
    axes, _spacing, hu, step, coarse, coarse_spacing = _axial(reference)
    trunk = _trunk_of(reference, trunk)
    _, trunk_cores, limb_cores = trunk.cores
    blank = np.zeros(coarse.shape, dtype=bool)
    for z in np.flatnonzero(limb_cores.any(axis=(1, 2))):
        limb = _beside(limb_cores[z], trunk.near_trunk[z])
        if limb.any():
            to_limb = ndimage.distance_transform_edt(~limb, sampling=coarse_spacing)
            to_trunk = ndimage.distance_transform_edt(~trunk_cores[z], sampling=coarse_spacing)
            # An arm pressed on the trunk meets it midway between their cores: the nearer core
            # decides; the trunk's cores grown to its skin (`TRUNK_CORE_MM`) are never blanked.
            blank[z] = (to_limb <= TRUNK_CORE_MM + LIMB_MARGIN_MM) & (to_limb <= to_trunk) & (to_trunk > TRUNK_CORE_MM)
    inverse = tuple(int(i) for i in np.argsort(axes))
    return _full(blank, step, hu.shape).transpose(inverse)


def _beside(limb_cores: np.ndarray, trunk: np.ndarray) -> np.ndarray:
    """The limb cores of a slice whose centre lies beside the trunk (left or right of all its
    columns): an arm; not a breast or the chin in front of it, which the model must still see."""
    columns = np.flatnonzero(trunk.any(axis=0))
    labels, n = cc3d.connected_components(limb_cores, connectivity=8, return_N=True)
    which = labels[labels > 0]
    x = np.nonzero(labels)[1]
    centre = np.bincount(which, weights=x, minlength=n + 1)[1:] / np.bincount(which, minlength=n + 1)[1:]
    return np.isin(labels, np.flatnonzero((centre < columns[0]) | (centre > columns[-1])) + 1)


def blank_limbs(reference: sitk.Image, classes: Iterable[ClassInfo], trunk: Trunk | None = None
                ) -> tuple[sitk.Image, float]:
    """`reference` with its limbs (`limbs_to_blank`) set to air, for the model's eyes only, and the
    millilitres blanked. An arm beside the trunk moves the model's own output (its context, the
    body crop's box); blanked, the model sees the scan as without arms (issue 25). Masks and HU
    statistics still come from `reference`.

    Unchanged (the same image, 0.0) when a class may lie in a limb (`Location.trunk` false: its
    voxels would be blanked) or when no limb is found.

    Args:
        reference: the CT in HU.
        classes: the classes the model computes.
        trunk: the limb finder's result on `reference` (`Trunk`), else found here.
    """
    if not all(Location.of(info).trunk for info in classes):
        return reference, 0.0
    blank = limbs_to_blank(reference, trunk)
    if not blank.any():
        return reference, 0.0
    hu = sitk.GetArrayFromImage(reference)
    hu = hu.astype(np.promote_types(hu.dtype, np.int16))  # an unsigned array cannot hold air
    hu[blank] = BLANK_HU
    out = sitk.GetImageFromArray(hu)
    out.CopyInformation(reference)
    return out, float(np.count_nonzero(blank) * np.prod(reference.GetSpacing())) / 1000.0
