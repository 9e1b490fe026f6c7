"""Training volumes on the model grid, with the same geometry code as inference (`UniversalSegLib.geometry`).

Images and label files are read with SimpleITK (a DICOM folder through `io.image.read_image`); labels
stored on another grid than their image are brought onto it. `CaseGrid` then applies one
reorientation (RAS), crop (inference's body box, `geometry.crop_box`) and resampling to the image
and to every label volume, so all arrays come out in the (x, y, z) model layout on one grid.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from UniversalSegLib.errors import InputError
from UniversalSegLib.geometry import array_xyz, crop_box, resample_to_spacing, to_ras


def read_ct(path: Path) -> sitk.Image:
    """A training CT as float32. Files are read with SimpleITK directly (light enough for pool workers);
    a folder goes through `io.image.read_image` (DICOM series), where non-CT intensities only warn."""
    path = Path(path)
    if path.is_dir():
        from UniversalSegLib.io.image import NonCTWarning, read_image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonCTWarning)
            return sitk.Cast(read_image(path, allow_non_ct=True), sitk.sitkFloat32)
    return sitk.Cast(_read(path, "image"), sitk.sitkFloat32)


def _read(path: Path, what: str) -> sitk.Image:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read {what} file {path}: {str(exc).strip().splitlines()[-1]}") from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: expected a 3D single-channel {what} volume")
    return image


def read_label(path: Path) -> sitk.Image:
    """A label map or mask file, any pixel type."""
    return _read(path, "label")


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    """True when two images share one voxel grid (size, and spacing/origin/direction within `tol`)."""
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * max(a.GetSpacing()))
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


class CaseGrid:
    """The model grid of one training case: RAS, cropped by `geometry.crop_box` (the rule inference uses),
    resampled to `spacing` mm; the image and each of its label volumes go through the same steps."""

    def __init__(self, image: sitk.Image, spacing, foreground_crop: bool):
        self.source = image
        self.spacing = tuple(float(s) for s in spacing)
        self.ras = ras = to_ras(image)
        self.box = crop_box(ras, foreground_crop)

    def _apply(self, image: sitk.Image, interpolator, default: float) -> sitk.Image:
        ras = self.ras if image is self.source else to_ras(image)
        return resample_to_spacing(ras[self.box], self.spacing, interpolator, default)

    def image(self, default_hu: float) -> np.ndarray:
        """The image as a float32 (x, y, z) array; new border voxels get `default_hu`."""
        return array_xyz(self._apply(self.source, sitk.sitkLinear, default_hu))

    def label(self, label: sitk.Image, binary: bool) -> np.ndarray:
        """A label volume on this grid (nearest neighbour): int32 values, or bool for a mask."""
        if binary:
            label = sitk.Cast(label > 0.5 if label.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64)
                              else label != 0, sitk.sitkUInt8)
        elif label.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
            rounded = sitk.GetImageFromArray(np.rint(sitk.GetArrayViewFromImage(label)).astype(np.int32))
            rounded.CopyInformation(label)
            label = rounded
        if not same_grid(label, self.source):
            label = sitk.Resample(label, self.source, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        out = array_xyz(self._apply(label, sitk.sitkNearestNeighbor, 0))
        return out.astype(bool) if binary else out.astype(np.int32)
