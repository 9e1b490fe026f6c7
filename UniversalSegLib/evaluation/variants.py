"""Evaluation variants of a real CT: is a model's result stable when the scan changes?

Built by geometry and additive HU offsets on the scan's own grid, NOT by the training generator
(`UniversalSegLib.data.synth` re-draws a contrast phase by painting each structure with one random
mean in model space, which the window saturates). Each variant keeps the reference labels valid
on its grid, so Dice against them measures the model, not the variant.

- Field of view and sampling (issue 8): `slab` / `centred_slab` (a few slices), `pad_plane` (a
  large field of view, air around the body), `resample` (another voxel spacing, same extent).
- `compose_arms` (issue 25): upper arms drawn from geometry (skin, subcutaneous fat, muscle,
  humerus cortex and marrow, each with partial-volume edges and the scan's own noise level) beside
  the trunk, at a chosen gap (0 or less: touching) and antero-posterior shift, the plane widened
  with air where the arm would leave the field of view. Labels get 0 there: no class lies in an arm.
- `portal_venous` (issue 25): the scan's real voxels plus an offset per structure (vessels to a
  target mean, organs by a fixed enhancement, kidney cortex more than medulla), the offsets blended
  across label borders by a Gaussian so no hard edge appears; the voxels' texture is kept.
  `reenhance` does the same from per-class masks (scan B's arteries: arterial -> portal-venous).

Used by the experiments (`experiments/check_generalisation.py`, `experiments/measure_variants.py`)
and by `Testing/test_plausibility.py` and `Testing/test_evaluation_variants.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import cc3d
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

SAMPLE = Path(__file__).resolve().parents[1] / "resources" / "sample"
LABEL_NAMES = SAMPLE / "totalsegmentator_v2_label_names.json"

# Arm tissues (HU): literature-typical values for adult CT.
SKIN_HU, FAT_HU, MUSCLE_HU, CORTEX_HU, MARROW_HU = 30.0, -100.0, 50.0, 1100.0, -30.0
AIR_HU = -1000.0

# Portal-venous phase (about 70 s after injection). Vessels: target mean HU; organs: HU added.
PV_TARGET_HU = {"aorta": 180.0, "portal_vein_and_splenic_vein": 130.0, "inferior_vena_cava": 90.0,
                "iliac_artery_left": 170.0, "iliac_artery_right": 170.0,
                "iliac_vena_left": 90.0, "iliac_vena_right": 90.0,
                # aortic branches (scan B labels them; TotalSegmentator v2 has no celiac trunk or SMA)
                "celiac_trunk": 170.0, "superior_mesenteric_artery": 170.0, "subclavian_artery_left": 170.0,
                "common_carotid_artery_left": 170.0, "brachiocephalic_trunk": 170.0}
PV_OFFSET_HU = {"liver": 50.0, "spleen": 60.0, "pancreas": 40.0, "adrenal_gland_left": 30.0,
                "adrenal_gland_right": 30.0, "duodenum": 20.0, "stomach": 10.0}
KIDNEY_CORTEX_HU, KIDNEY_MEDULLA_HU, KIDNEY_CORTEX_MM = 100.0, 70.0, 6.0


def label_ids() -> dict[str, int]:
    """TotalSegmentator v2 name -> id of the sample label map (registry keys where they differ:
    `label_ids()["portal_vein_and_splenic_vein"]`)."""
    names = {v: int(k) for k, v in json.loads(LABEL_NAMES.read_text()).items()}
    aliases = {"intestine": "small_bowel", "prostate_or_uterus": "prostate"}
    return {**names, **{key: names[name] for key, name in aliases.items() if name in names}}


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The body in (z, y, x): above -300 HU, holes filled per slice, the largest 3D component."""
    body = hu > -300
    for z in range(body.shape[0]):
        body[z] = ndimage.binary_fill_holes(body[z])
    return cc3d.largest_k(body, k=1, connectivity=6) > 0


def slab(image: sitk.Image, first: int, count: int) -> sitk.Image:
    """Slices first..first+count-1 along the image's third index axis, its own geometry kept.

    Args:
        image: any 3D image (CT or label map).
        first: index of the first slice kept.
        count: number of slices kept.
    """
    size = list(image.GetSize())
    return sitk.RegionOfInterest(image, [size[0], size[1], count], [0, 0, first])


def centred_slab(ct: sitk.Image, labels: sitk.Image, mid: int, count: int) -> tuple[sitk.Image, sitk.Image]:
    """`count` slices of a CT and its labels centred on slice `mid`, shifted to stay inside the scan.

    Args:
        ct: the CT.
        labels: its label map on the same grid.
        mid: the slice the slab is centred on.
        count: number of slices.
    """
    first = int(np.clip(mid - count // 2, 0, ct.GetSize()[2] - count))
    return slab(ct, first, count), slab(labels, first, count)


def mid_slice(labels: sitk.Image, ids: list[int]) -> int:
    """The slice halfway through the combined axial extent of the label `ids`.

    Args:
        labels: a label map.
        ids: the label values whose extent counts.
    """
    z = np.nonzero(np.isin(sitk.GetArrayViewFromImage(labels), ids))[0]
    return int(round((z.min() + z.max()) / 2))


def pad_plane(image: sitk.Image, fov_mm: float, value: float) -> sitk.Image:
    """Both in-plane axes padded symmetrically to `fov_mm` (a large field of view, air around the body).

    Args:
        image: a CT or label map.
        fov_mm: the in-plane extent wanted.
        value: the padding value (-1024 for a CT, 0 for labels).
    """
    pad = [max(0, int(round((fov_mm / s - n) / 2))) for n, s in zip(image.GetSize()[:2], image.GetSpacing()[:2])]
    return sitk.ConstantPad(image, [*pad, 0], [*pad, 0], value)


def resample(image: sitk.Image, spacing: tuple[float, float, float], interpolator: int, value: float) -> sitk.Image:
    """`image` on a grid of `spacing` covering the same extent (same origin and direction).

    Args:
        image: a CT or label map.
        spacing: the new voxel spacing in mm (x, y, z).
        interpolator: a SimpleITK interpolator (linear for a CT, nearest neighbour for labels).
        value: the value outside the image.
    """
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), spacing,
                         image.GetDirection(), value, image.GetPixelID())


class Arm(NamedTuple):
    """One upper arm beside the trunk.

    side: "low" or "high" end of the array's x axis. gap_mm: air between the trunk's widest point
    over the arm's slices and the arm's skin (<= 0: touching, the arm pressed that far in).
    shift_mm: antero-posterior offset of the arm's centre from the trunk's mid-depth (+ toward
    higher y index). radius_mm: the arm's outer radius. z_from/z_to: slice range as fractions.
    """

    side: str
    gap_mm: float = 10.0
    shift_mm: float = 0.0
    radius_mm: float = 45.0
    z_from: float = 0.0
    z_to: float = 1.0


def _soft_inside(distance: np.ndarray, radius: float, voxel: float) -> np.ndarray:
    """Fraction of each voxel inside a circle of `radius` (linear ramp over one voxel: partial volume)."""
    return np.clip((radius - distance) / voxel + 0.5, 0.0, 1.0)


def _arm_slice(shape_yx, spacing_yx, centre_yx, radius: float, humerus_yx, noise: np.ndarray) -> tuple:
    """(HU, alpha) of one arm cross-section: skin, fat, muscle, humerus cortex, marrow."""
    yy, xx = np.indices(shape_yx, dtype=np.float64)
    dy, dx = (yy - centre_yx[0]) * spacing_yx[0], (xx - centre_yx[1]) * spacing_yx[1]
    d_arm = np.hypot(dy, dx * 1.08)  # slightly flattened side to side
    d_bone = np.hypot((yy - humerus_yx[0]) * spacing_yx[0], (xx - humerus_yx[1]) * spacing_yx[1])
    voxel = float(np.mean(spacing_yx))
    layers = [(radius, SKIN_HU), (radius - 2.0, FAT_HU), (radius - 11.0, MUSCLE_HU)]
    hu = np.full(shape_yx, AIR_HU)
    for r, value in layers:
        a = _soft_inside(d_arm, r, voxel)
        hu = hu * (1 - a) + value * a
    for r, value in ((11.0, CORTEX_HU), (7.5, MARROW_HU)):
        a = _soft_inside(d_bone, r, voxel)
        hu = hu * (1 - a) + value * a
    alpha = _soft_inside(d_arm, radius, voxel)
    return hu + noise * alpha, alpha


def _noise_std(hu: np.ndarray, body: np.ndarray) -> float:
    """The scan's noise: the standard deviation of its fat (-150..-50 HU) inside the body."""
    fat = hu[body & (hu > -150) & (hu < -50)]
    return float(np.std(fat)) if fat.size > 100 else 15.0


def compose_arms(image: sitk.Image, labels: sitk.Image | None, arms: list[Arm], seed: int = 0,
                 margin_mm: float = 15.0) -> tuple[sitk.Image, sitk.Image | None, np.ndarray]:
    """`image` (and `labels`) with `arms` drawn beside the trunk; returns (image, labels, arm mask).

    The plane is padded with air (labels 0) along x where an arm would leave it; the origin moves
    so every original voxel keeps its physical position. The arm mask is bool (z, y, x) on the new grid.

    Args:
        image: a CT in HU (axial slices: array axis 0 is cranio-caudal).
        labels: its label map, or None.
        arms: the arms to draw (`Arm`).
        seed: noise seed.
        margin_mm: air kept between an arm and the new plane's border.
    """
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    sx, sy, sz = image.GetSpacing()
    body = body_mask(hu)
    xs = np.flatnonzero(body.any(axis=(0, 1)))
    need = {"low": 0, "high": 0}
    for arm in arms:
        room = (arm.gap_mm + 2 * arm.radius_mm + margin_mm) / sx
        edge = xs[0] if arm.side == "low" else hu.shape[2] - 1 - xs[-1]
        need[arm.side] = max(need[arm.side], int(np.ceil(room - edge)))
    pad = ((0, 0), (0, 0), (need["low"], need["high"]))
    hu = np.pad(hu, pad, constant_values=AIR_HU)
    body = np.pad(body, pad)
    rng = np.random.default_rng(seed)
    std = _noise_std(hu, body)
    arm_mask = np.zeros(hu.shape, dtype=bool)
    out = hu.copy()
    for arm in arms:
        z0, z1 = int(arm.z_from * hu.shape[0]), max(int(arm.z_from * hu.shape[0]) + 1, int(arm.z_to * hu.shape[0]))
        span = body[z0:z1]
        cols = np.flatnonzero(span.any(axis=(0, 1)))
        rows = np.flatnonzero(span.any(axis=(0, 2)))
        edge = cols[0] if arm.side == "low" else cols[-1]
        sign = -1 if arm.side == "low" else 1
        cy = (rows[0] + rows[-1]) / 2 + arm.shift_mm / sy
        for i, z in enumerate(range(z0, z1)):
            t = i / max(1, z1 - z0 - 1)
            radius = arm.radius_mm * (1.0 - 0.12 * t)  # narrower toward the elbow
            cx = edge + sign * (arm.gap_mm + radius) / sx + sign * 4.0 * t / sx  # a slight outward slant
            noise = ndimage.gaussian_filter(rng.normal(0, 1, hu.shape[1:]), 0.7)
            noise *= std / max(float(noise.std()), 1e-6)
            humerus = (cy - 6.0 / sy, cx + sign * 4.0 / sx)
            value, alpha = _arm_slice(hu.shape[1:], (sy, sx), (cy, cx), radius, humerus, noise)
            free = ~body[z]  # the trunk's own voxels are kept where the arm presses on it
            out[z] = np.where(free & (alpha > 0), hu[z] * (1 - alpha) + value * alpha, out[z])
            arm_mask[z] |= free & (alpha >= 0.5)
    result = sitk.GetImageFromArray(out)
    result.SetSpacing(image.GetSpacing())
    result.SetDirection(image.GetDirection())
    result.SetOrigin(image.TransformIndexToPhysicalPoint((-need["low"], 0, 0)))
    new_labels = None
    if labels is not None:
        lab = np.pad(sitk.GetArrayFromImage(labels), pad)
        new_labels = sitk.GetImageFromArray(lab)
        new_labels.CopyInformation(result)
    return result, new_labels, arm_mask


def crop_to(image_or_mask: np.ndarray, original: sitk.Image, composed: sitk.Image) -> np.ndarray:
    """A (z, y, x) array on `composed`'s grid cut back to `original`'s (undo `compose_arms`'s padding)."""
    start = composed.TransformPhysicalPointToIndex(original.GetOrigin())
    nx = original.GetSize()[0]
    return image_or_mask[:, :, start[0]:start[0] + nx]


def portal_venous(image: sitk.Image, labels: sitk.Image, border_sigma_mm: float = 1.5) -> sitk.Image:
    """`image` re-enhanced to a portal-venous phase: the real voxels plus per-structure offsets.

    Vessels (`PV_TARGET_HU`) are shifted so their median reaches the target; organs
    (`PV_OFFSET_HU`) gain a fixed enhancement; kidneys gain `KIDNEY_CORTEX_HU` in their outer
    `KIDNEY_CORTEX_MM` and `KIDNEY_MEDULLA_HU` inside. Each structure's offset applies in full
    inside it and fades outside by a Gaussian of `border_sigma_mm`, so borders blend as partial volume
    (session 14; until then it faded inside the border too, and a thin vessel never reached its target).

    Args:
        image: the native CT in HU.
        labels: its TotalSegmentator v2 label map (`label_ids`).
        border_sigma_mm: width of the blend across label borders.
    """
    lab = sitk.GetArrayFromImage(labels)
    ids = label_ids()
    keys = [*PV_TARGET_HU, *PV_OFFSET_HU, "kidney_left", "kidney_right"]
    return reenhance(image, {k: lab == ids[k] for k in keys if k in ids}, border_sigma_mm)


def reenhance(image: sitk.Image, regions: dict[str, np.ndarray], border_sigma_mm: float = 1.5) -> sitk.Image:
    """`portal_venous` from per-class masks: each region named in `PV_TARGET_HU` is shifted to its
    target median, those in `PV_OFFSET_HU` gain their offset, kidneys get cortex and medulla offsets;
    other regions are left alone.

    Args:
        image: the CT in HU.
        regions: class key -> bool mask in the image's array order.
        border_sigma_mm: width of the blend across region borders.
    """
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    empty = np.zeros(hu.shape, bool)
    sigma = [border_sigma_mm / s for s in reversed(image.GetSpacing())]
    offset = np.zeros_like(hu)
    weight = np.zeros_like(hu)
    inside = np.zeros(hu.shape, bool)

    def add(region: np.ndarray, value: float) -> None:
        w = ndimage.gaussian_filter(region.astype(np.float32), sigma)
        offset[...] += w * value
        weight[...] += w
        inside[...] |= region

    for key, target in PV_TARGET_HU.items():
        region = regions.get(key, empty)
        if region.any():
            add(region, target - float(np.median(hu[region])))
    for key, value in PV_OFFSET_HU.items():
        region = regions.get(key, empty)
        if region.any():
            add(region, value)
    for key in ("kidney_left", "kidney_right"):
        region = regions.get(key, empty)
        if region.any():
            depth = ndimage.distance_transform_edt(region, sampling=list(reversed(image.GetSpacing())))
            add(region & (depth <= KIDNEY_CORTEX_MM), KIDNEY_CORTEX_HU)
            add(region & (depth > KIDNEY_CORTEX_MM), KIDNEY_MEDULLA_HU)
    # Inside a structure, and where blurred structures overlap, the weighted mean of the offsets (a
    # thin vessel, whose blurred weight stays below 1, still reaches its target); outside, the offset
    # fades with the weight (partial volume across the border).
    offset = np.where(inside | (weight > 1.0), offset / np.maximum(weight, 1e-6), offset)
    out = sitk.GetImageFromArray(hu + offset)
    out.CopyInformation(image)
    return out
