"""Helpers shared by the writers: the reference grid's affine, images on that grid, and masks by bounding box.

Writers read each class's mask as (bounding-box slices, the mask inside the box), so their cost
follows the structure's size, not the volume's. A `ClassResult` that stores its mask compactly
(a `box` attribute with `slices` and `crop()`) gives that for free; a plain array is boxed here.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from UniversalSegLib.inference.result import ClassResult, SegmentationResult

Slices = tuple[slice, slice, slice]
EMPTY_SLICES: Slices = (slice(0, 0), slice(0, 0), slice(0, 0))


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 matrix from voxel index (i, j, k) = (x, y, z) to physical LPS millimetres, as SimpleITK defines it."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def grid_shape(image: sitk.Image) -> tuple[int, int, int]:
    """The (z, y, x) array shape of an image."""
    return tuple(reversed(image.GetSize()))  # type: ignore[return-value]


def array_on_grid(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Wrap a (z, y, x) array as an image with exactly the reference's spacing, origin and direction."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def mask_parts(c: ClassResult) -> tuple[Slices, np.ndarray]:
    """(bounding-box slices, bool mask inside them) of a class; empty masks give empty slices."""
    box = getattr(c, "box", None)
    if box is not None:
        return (box.slices, box.crop()) if box.count else (EMPTY_SLICES, np.zeros((0, 0, 0), bool))
    mask = np.asarray(c.mask, dtype=bool)
    found = ndimage.find_objects(mask.view(np.uint8))
    if not found:
        return EMPTY_SLICES, np.zeros((0, 0, 0), bool)
    return found[0], mask[found[0]]


def full_mask(slices: Slices, crop: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The full-size bool mask from its box."""
    out = np.zeros(shape, dtype=bool)
    out[slices] = crop
    return out


def mask_shape(c: ClassResult) -> tuple[int, ...]:
    box = getattr(c, "box", None)
    return tuple(box.shape) if box is not None else np.shape(c.mask)


def check_masks(result: SegmentationResult) -> None:
    """Refuse results whose masks are not on the reference grid (a programming error, not a user error)."""
    shape = grid_shape(result.reference)
    for c in result.classes:
        if mask_shape(c) != shape:
            raise ValueError(f"mask of {c.info.key} has shape {mask_shape(c)}, the reference image {shape}")
        if c.probability is not None and c.probability.shape != shape:
            raise ValueError(f"probability of {c.info.key} has shape {c.probability.shape}, the reference {shape}")
