"""From a CT in Hounsfield units (any orientation, any spacing) to the model's input.

As the manifest's `Preprocessing` says, and with the same geometry code as training
(`UniversalSegLib.geometry`): reorient (RAS), crop to the body, resample linearly to the model
spacing, clip the HU window and scale it to [0, 1]. The array comes out in the (x, y, z) model
layout. `ModelGrid` keeps the geometry of that array (origin, spacing, direction), which is all
that is needed to map a prediction back onto the input's grid exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from UniversalSegLib.geometry import array_xyz, normalise_hu, resample_to_spacing
from UniversalSegLib.store.manifest import Preprocessing

BODY_HU = -500.0  # above air and lung parenchyma edges: the body's bounding box
BODY_MARGIN_MM = 6.0


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
        matrix = np.eye(4)
        matrix[:3, :3] = np.reshape(self.direction, (3, 3)) @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def sub_image(self, array_xyz_: np.ndarray, start: tuple[int, int, int]) -> sitk.Image:
        """An (x, y, z) sub-array starting at index `start`, as an image placed on this grid."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz_.transpose(2, 1, 0)))
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        image.SetOrigin(tuple(float(v) for v in (self.index_to_lps @ [*start, 1.0])[:3]))
        return image


@dataclass
class Prepared:
    """The model input and where it lies."""

    volume: np.ndarray  # float32 (x, y, z), HU window scaled to [0, 1]
    grid: ModelGrid  # geometry of `volume`
    body_box: tuple[slice, slice, slice]  # (x, y, z) crop of the reoriented input, before resampling


def body_box(image: sitk.Image, threshold: float = BODY_HU,
             margin_mm: float = BODY_MARGIN_MM) -> tuple[slice, slice, slice]:
    """(x, y, z) bounding box of voxels above `threshold`, grown by `margin_mm`; all of it if none."""
    above = sitk.GetArrayViewFromImage(image) > threshold  # (z, y, x)
    box = []
    for axis, (n, spacing) in enumerate(zip(image.GetSize(), image.GetSpacing())):
        hit = np.flatnonzero(above.any(axis=tuple(a for a in range(3) if a != 2 - axis)))
        margin = int(np.ceil(margin_mm / spacing))
        box.append(slice(max(0, int(hit[0]) - margin), min(n, int(hit[-1]) + 1 + margin)) if hit.size
                   else slice(0, n))
    return tuple(box)  # type: ignore[return-value]


def preprocess(image: sitk.Image, pre: Preprocessing) -> Prepared:
    """The model input for `image` (HU) as `pre` describes it, and its geometry."""
    oriented = sitk.DICOMOrient(image, pre.orientation)
    box = body_box(oriented) if pre.foreground_crop else tuple(slice(0, n) for n in oriented.GetSize())
    cropped = sitk.Cast(oriented[box], sitk.sitkFloat32)
    del oriented
    low, high = (float(v) for v in pre.hu_window)
    # New border voxels get the window's low end, i.e. 0 after scaling, as in training.
    resampled = resample_to_spacing(cropped, tuple(pre.spacing), sitk.sitkLinear, low)
    del cropped
    volume = np.ascontiguousarray(normalise_hu(array_xyz(resampled), (low, high)))
    return Prepared(volume, ModelGrid.of(resampled), box)
