"""Model-space conventions shared by training and inference.

Model space = RAS orientation, arrays laid out (x, y, z) as nibabel and MONAI do. Index +1
along x moves toward the patient's right, so of two paired organs the one with the smaller
mean x index is the patient's LEFT one (checked on the sample CT's kidney labels).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def to_ras(image: sitk.Image) -> sitk.Image:
    """Reorient to RAS: direction diag(-1, -1, 1) in ITK's LPS world."""
    return sitk.DICOMOrient(image, "RAS")


def array_xyz(image: sitk.Image) -> np.ndarray:
    """SimpleITK (z, y, x) array -> (x, y, z) model layout.

    A copy, not GetArrayViewFromImage: a view dies with its image and would crash later.
    """
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def image_from_xyz(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """(x, y, z) array -> SimpleITK image with the reference's geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.CopyInformation(reference)
    return image


def resample_to_spacing(image: sitk.Image, spacing: tuple[float, float, float], interpolator=sitk.sitkLinear,
                        default_value: float = 0.0) -> sitk.Image:
    """Resample onto a grid with the given spacing covering the same physical extent."""
    old_size, old_spacing = np.array(image.GetSize()), np.array(image.GetSpacing())
    new_size = np.maximum(1, np.round(old_size * old_spacing / np.array(spacing))).astype(int)
    return sitk.Resample(image, [int(s) for s in new_size], sitk.Transform(), interpolator, image.GetOrigin(),
                         tuple(float(s) for s in spacing), image.GetDirection(), default_value,
                         image.GetPixelID())


def normalise_hu(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip HU to the window and scale to [0, 1] (float32)."""
    lo, hi = window
    return ((np.clip(array.astype(np.float32), lo, hi) - lo) / (hi - lo)).astype(np.float32)
