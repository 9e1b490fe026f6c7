"""Training augmentation (MONAI), per the method: no flips, because flipping would turn a left organ
into a mirrored right one; rotations keep the patient's handedness, so they are allowed.

Applied to {"image": (1,D,H,W), "label": (C,D,H,W)} patches; labels are resampled nearest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from monai.transforms import (
    Compose,
    EnsureTyped,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
)

log = logging.getLogger("UniversalSegLib.data")


def training_transforms(patch_size: Sequence[int] = (96, 96, 96), zoom: bool = False, rotate_prob: float = 0.1,
                        shift: float = 0.1, shift_prob: float = 0.2, scale: float = 0.1, scale_prob: float = 0.15,
                        zoom_prob: float = 0.3, zoom_range: tuple[float, float] = (1.3, 1.5)) -> Compose:
    """The papers' augmentation: 90-degree rotation in the axial plane (p=0.1), intensity shift 0.1
    (p=0.2), a light intensity scale, and optionally zoom 1.3-1.5 (p=0.3, the reference's MSD setting).

    The rotation is skipped when the patch is not square in the axial plane (it would change the shape).
    """
    keys = ("image", "label")
    steps: list = [EnsureTyped(keys=keys, track_meta=False)]
    if rotate_prob > 0:
        if patch_size[0] == patch_size[1]:
            # RAS arrays: axes 0 (left-right) and 1 (posterior-anterior) span the axial plane.
            steps.append(RandRotate90d(keys=keys, prob=rotate_prob, max_k=3, spatial_axes=(0, 1)))
        else:
            log.warning("axial rotation skipped: patch %s is not square in the axial plane", tuple(patch_size))
    if zoom and zoom_prob > 0:
        # "nearest-exact" samples the same positions as trilinear with align_corners=False; plain "nearest"
        # would shift the labels by up to half a voxel against the image.
        steps.append(RandZoomd(keys=keys, prob=zoom_prob, min_zoom=zoom_range[0], max_zoom=zoom_range[1],
                               mode=("trilinear", "nearest-exact"), align_corners=(False, None), keep_size=True))
    if scale_prob > 0:
        steps.append(RandScaleIntensityd(keys="image", factors=scale, prob=scale_prob))
    if shift_prob > 0:
        steps.append(RandShiftIntensityd(keys="image", offsets=shift, prob=shift_prob))
    return Compose(steps)
