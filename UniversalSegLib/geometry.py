"""Geometry, in one place: model space, the voxel-to-world affine, the body crop, grids and masks on them.

Model space = RAS orientation, arrays laid out (x, y, z) as nibabel and MONAI do. Index +1
along x moves toward the patient's right, so of two paired organs the one with the smaller
mean x index is the patient's LEFT one (checked on the sample CT's kidney labels).

SimpleITK arrays and the outputs use (z, y, x); the writers read each class's mask as
(bounding-box slices, the mask inside the box), so their cost follows the structure's size, not
the volume's. A `ClassResult` that stores its mask compactly (a `box` attribute with `slices`
and `crop()`) gives that for free; a plain array is boxed here.

Training (`data/volume.py`) and inference (`inference/preprocess.py`) crop with the same rule,
`crop_box`, and resample with the same `resample_to_spacing`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

if TYPE_CHECKING:  # only for annotations: the geometry must not depend on the inference package
    from UniversalSegLib.inference.result import ClassResult, SegmentationResult

Slices = tuple[slice, slice, slice]
EMPTY_SLICES: Slices = (slice(0, 0), slice(0, 0), slice(0, 0))
BODY_HU = -500.0  # above air and lung parenchyma edges: the body's bounding box
BODY_MARGIN_MM = 6.0


# --- orientation, layout, resampling -------------------------------------------------------------

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
    return array_on_grid(np.ascontiguousarray(array.transpose(2, 1, 0)), reference)


def array_on_grid(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Wrap a (z, y, x) array as an image with exactly the reference's spacing, origin and direction."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def grid_shape(image: sitk.Image) -> tuple[int, int, int]:
    """The (z, y, x) array shape of an image."""
    return tuple(reversed(image.GetSize()))  # type: ignore[return-value]


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


# --- the affine ----------------------------------------------------------------------------------

def index_to_lps(spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """4x4 matrix from voxel index (i, j, k) = (x, y, z) to physical LPS millimetres, as SimpleITK defines it.

    Args:
        spacing: voxel size along (x, y, z) in mm.
        origin: LPS position of voxel (0, 0, 0).
        direction: 3x3 row-major; column c is the LPS direction of index axis c.
    """
    matrix = np.eye(4)
    matrix[:3, :3] = np.reshape(np.asarray(direction, dtype=float), (3, 3)) @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """`index_to_lps` of an image's grid."""
    return index_to_lps(image.GetSpacing(), image.GetOrigin(), image.GetDirection())


# --- the body crop (one rule for training and inference) ------------------------------------------

def body_box(image: sitk.Image, threshold: float = BODY_HU, margin_mm: float = BODY_MARGIN_MM) -> Slices:
    """(x, y, z) bounding box of voxels above `threshold`, grown by `margin_mm`; all of it if none."""
    above = sitk.GetArrayViewFromImage(image) > threshold  # (z, y, x)
    box = []
    for axis, (n, spacing) in enumerate(zip(image.GetSize(), image.GetSpacing())):
        hit = np.flatnonzero(above.any(axis=tuple(a for a in range(3) if a != 2 - axis)))
        margin = int(np.ceil(margin_mm / spacing))
        box.append(slice(max(0, int(hit[0]) - margin), min(n, int(hit[-1]) + 1 + margin)) if hit.size
                   else slice(0, n))
    return tuple(box)  # type: ignore[return-value]


def crop_box(oriented: sitk.Image, foreground_crop: bool) -> Slices:
    """The (x, y, z) part of a reoriented CT (HU) that goes onto the model grid: its body box, or all of it.

    Args:
        oriented: the CT in model orientation, in HU.
        foreground_crop: the manifest's `Preprocessing.foreground_crop`.
    """
    return body_box(oriented) if foreground_crop else tuple(slice(0, n) for n in oriented.GetSize())  # type: ignore[return-value]


@dataclass(frozen=True)
class ModelGrid:
    """Geometry of an (x, y, z) array on the model grid, in SimpleITK's (LPS) conventions."""

    size: tuple[int, int, int]  # (x, y, z)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3, row-major, columns are the axes' directions

    @classmethod
    def of(cls, image: sitk.Image) -> ModelGrid:
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    @property
    def index_to_lps(self) -> np.ndarray:
        """4x4 matrix from (x, y, z) voxel index to LPS millimetres."""
        return index_to_lps(self.spacing, self.origin, self.direction)

    def sub_image(self, array_xyz_: np.ndarray, start: tuple[int, int, int]) -> sitk.Image:
        """An (x, y, z) sub-array starting at index `start`, as an image placed on this grid."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz_.transpose(2, 1, 0)))
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        image.SetOrigin(tuple(float(v) for v in (self.index_to_lps @ [*start, 1.0])[:3]))
        return image


# --- masks on the reference grid, by bounding box -------------------------------------------------

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
