"""A small arm-drawing helper for tests: an upper arm (skin and fat ring, muscle, humerus) beside the
trunk of a real axial CT, the plane widened with air. Geometry only; the evaluation variants with
partial volume and the scan's own noise live with the experiments (compose_arms)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

AIR_HU, FAT_HU, MUSCLE_HU, BONE_HU = -1000, -100, 50, 1000


def with_arm(image: sitk.Image, side: str, gap_mm: float,
             radius_mm: float = 45.0) -> tuple[sitk.Image, np.ndarray, int]:
    """`image` with one arm beside its body along the array's x axis: (image, arm mask, x offset).

    The plane gains air columns on `side` ("low" or "high" x) and every original voxel keeps its
    physical position; the original array starts at the returned x offset of the new one.

    Args:
        image: an axial CT in HU (array axis 0 cranio-caudal).
        side: where the arm goes.
        gap_mm: air between the body's outermost column and the arm's skin (0: touching).
        radius_mm: the arm's outer radius.
    """
    hu = sitk.GetArrayFromImage(image).astype(np.int16)
    sx, sy, _ = image.GetSpacing()
    body = hu > -500
    cols = np.flatnonzero(body.any(axis=(0, 1)))
    rows = np.flatnonzero(body.any(axis=(0, 2)))
    pad = int(np.ceil((gap_mm + 2 * radius_mm + 15.0) / sx))
    low = pad if side == "low" else 0
    hu = np.pad(hu, ((0, 0), (0, 0), (low, pad - low)), constant_values=AIR_HU)
    edge = cols[0] + low if side == "low" else cols[-1]
    sign = -1 if side == "low" else 1
    cx, cy = edge + sign * (gap_mm + radius_mm) / sx, (rows[0] + rows[-1]) / 2
    yy, xx = np.indices(hu.shape[1:])
    distance = np.hypot((yy - cy) * sy, (xx - cx) * sx)
    humerus = np.hypot((yy - cy) * sy, (xx - cx - sign * 5.0 / sx) * sx) <= 11.0
    arm = (distance <= radius_mm) & (hu < -500)  # the plane's own air only: the trunk is never painted over
    value = np.where(humerus, BONE_HU, np.where(distance <= radius_mm - 10.0, MUSCLE_HU, FAT_HU))
    hu = np.where(arm, value.astype(np.int16), hu)
    out = sitk.GetImageFromArray(hu)
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(image.GetDirection())
    out.SetOrigin(image.TransformIndexToPhysicalPoint((-low, 0, 0)))
    return out, arm, low
