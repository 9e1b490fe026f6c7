"""From a CT in Hounsfield units (any orientation, any spacing) to the model's input.

As the manifest's `Preprocessing` says, and with the same geometry code as training
(`UniversalSegLib.geometry`, where the crop rule lives): reorient (RAS), crop to the body,
resample linearly to the model spacing, clip the HU window and scale it to [0, 1]. The array comes
out in the (x, y, z) model layout. `ModelGrid` keeps the geometry of that array (origin, spacing,
direction), which is all that is needed to map a prediction back onto the input's grid exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from UniversalSegLib.geometry import ModelGrid, Slices, array_xyz, crop_box, normalise_hu, resample_to_spacing
from UniversalSegLib.store.manifest import Preprocessing


@dataclass
class Prepared:
    """The model input and where it lies."""

    volume: np.ndarray  # float32 (x, y, z), HU window scaled to [0, 1]
    grid: ModelGrid  # geometry of `volume`
    body_box: Slices  # (x, y, z) crop of the reoriented input, before resampling


def preprocess(image: sitk.Image, pre: Preprocessing) -> Prepared:
    """The model input for `image` (HU) as `pre` describes it, and its geometry."""
    oriented = sitk.DICOMOrient(image, pre.orientation)
    box = crop_box(oriented, pre.foreground_crop)
    cropped = sitk.Cast(oriented[box], sitk.sitkFloat32)
    del oriented
    low, high = (float(v) for v in pre.hu_window)
    # New border voxels get the window's low end, i.e. 0 after scaling, as in training.
    resampled = resample_to_spacing(cropped, tuple(pre.spacing), sitk.sitkLinear, low)
    del cropped
    volume = np.ascontiguousarray(normalise_hu(array_xyz(resampled), (low, high)))
    return Prepared(volume, ModelGrid.of(resampled), box)
