"""Read a CT volume (NIfTI, NRRD, MHA/MHD or a DICOM series folder) and check that it is a plausible CT.

Every check raises `InputError` with one line a user can act on, before any model runs.
Images keep SimpleITK's physical geometry (LPS); nothing is resampled or reoriented here.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from UniversalSegLib.errors import InputError, UniversalSegWarning
from UniversalSegLib.io.dicom_input import (
    DicomSeriesWarning,
    DicomStack,
    find_series,
    is_dicom_file,
    is_dicom_without_preamble,
    read_stack,
    without_preamble_error,
)
from UniversalSegLib.io.header_checks import check_file_header
from UniversalSegLib.io.itk_log import capture_itk_output

MIN_SIZE = 8  # voxels along each axis but the thinnest; fewer cannot be a useful 3D scan
# Slices along the thinnest axis. Measured on the bundled sample (3 mm slices, masks of a thin slab
# against the same slices of the whole scan's, Dice): 1 slice 0.00-0.62, 2 slices 0.00-0.87, 3 slices
# 0.59-0.82 for liver, spleen and kidneys; 8 slices 0.80-0.93. The pipeline runs down to 1 slice,
# but below 3 the masks are mostly wrong, so that is where we refuse (docs/input_checks.md).
MIN_SLICES = 3
SPACING_RANGE_MM = (0.1, 20.0)
# A CT's cross-section is bounded by its gantry bore (70-90 cm; reconstructed fields of view up to ~82 cm):
# an image wider than this along two axes has a wrong spacing. Such a scan also took minutes: 122x101x112
# voxels at 10 mm resample to 51 M voxels at the model's 3 mm (> 300 s on 1 CPU thread).
MAX_CROSS_SECTION_MM = 1000.0
# Direction cosines are written with 6 or more decimals; a sheared (tilted) grid is off by far more.
MAX_DIRECTION_ERROR = 1e-3
AIR_FAT_HU = -100.0  # CT in HU always has voxels below this (air outside the body, lungs, bowel gas, fat)
MAX_LABEL_VALUE = 1000  # label maps number their classes from 1 (TotalSegmentator v2: up to 117)
MAX_LABEL_VALUES = 128  # distinct values; a scan has hundreds at least
MIN_AIR_FAT_FRACTION = 0.001
MAX_P99_HU = 4000.0  # above this the 99.5th percentile is no tissue in HU (raw units, MR, or a wrong rescale)
# Metadata keys read_image sets on an image that came from a DICOM series (see dicom_source_files).
DICOM_FOLDER_KEY = "UniversalSeg.DicomFolder"
DICOM_SERIES_KEY = "UniversalSeg.DicomSeriesUID"
DICOM_FILES_KEY = "UniversalSeg.DicomFiles"  # JSON list of the source files, in slice order
_SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"
_AXES = "xyz"
_ITK_PREFIX = re.compile(r"^(ITK ERROR: )?\w+\(0x[0-9a-fA-F]+\): ")  # "ITK ERROR: NiftiImageIO(0x55d...): "


class NonCTWarning(UniversalSegWarning):
    """The image was accepted with allow_non_ct=True although its intensities do not look like CT."""


class ThinScanWarning(UniversalSegWarning):
    """The image has fewer than MIN_SIZE slices along one axis: structures are cut off at its faces."""


@dataclass(frozen=True)
class ImageSource:
    """An image as `read_image_source` read it, and the DICOM series it came from (None for a file):
    the series' headers, read once by the folder scan, serve every later DICOM check and writer."""

    image: sitk.Image
    dicom: DicomStack | None = None


def read_image(path: str | os.PathLike, allow_non_ct: bool = False, series_uid: str | None = None) -> sitk.Image:
    """Read a 3D CT in Hounsfield units with its geometry, and check it (see `read_image_source`)."""
    return read_image_source(path, allow_non_ct, series_uid).image


def read_image_source(path: str | os.PathLike, allow_non_ct: bool = False,
                      series_uid: str | None = None) -> ImageSource:
    """Read a 3D CT in Hounsfield units with its geometry, and check it (see `check_image`).

    Args:
        path: a NIfTI, NRRD or MetaImage file, a DICOM folder or one file of a DICOM series.
        allow_non_ct: turn the CT-likeness check into a `NonCTWarning`.
        series_uid: for DICOM, the SeriesInstanceUID to read; by default the CT series with the most
            slices, with a `DicomSeriesWarning` naming it when the folder holds several (see io/dicom_input.py).
    Integer images keep their type; float64 becomes float32. Raises InputError for anything we cannot segment.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"input image {path} does not exist")
    if not (path.is_dir() or path.is_file()):  # opening a named pipe would wait for a writer for ever
        raise InputError(f"input {path} is not a regular file (a pipe, device or socket); give an image file or a "
                         "DICOM series folder")
    if series_uid and not (path.is_dir() or is_dicom_file(path)):
        raise InputError(f"a series UID ({series_uid}) selects a series of a DICOM folder; {path} is not DICOM")
    stack = None
    with capture_itk_output():  # ITK's log lines become ITKWarnings (see itk_log)
        if path.is_dir() or is_dicom_file(path):
            image, stack = _read_dicom(path, series_uid)
        else:
            image = _read_file(path)
    if image.GetPixelID() == sitk.sitkFloat64:
        image = _cast_keep_metadata(image, sitk.sitkFloat32)
    check_image(image, name=str(path), allow_non_ct=allow_non_ct)
    warn_if_thin(image, str(path))
    return ImageSource(image, stack)


def thin_axis(image: sitk.Image) -> tuple[str, int] | None:
    """(axis name, voxel count) of an axis with fewer than MIN_SIZE voxels, or None when there is none."""
    size = image.GetSize()
    axis = int(np.argmin(size))
    return (_AXES[axis], size[axis]) if size[axis] < MIN_SIZE else None


def warn_if_thin(image: sitk.Image, name: str = "input image") -> None:
    """A ThinScanWarning when `image` has fewer than MIN_SIZE slices along one axis."""
    thin = thin_axis(image)
    if thin is not None:
        warnings.warn(f"{name} has only {thin[1]} slices along {thin[0]}: structures that go on beyond the scan "
                      "are cut off and their masks are less reliable; statistics flag them (touches_border)",
                      ThinScanWarning, stacklevel=3)


def check_image(image: sitk.Image, name: str = "input image", allow_non_ct: bool = False) -> None:
    """Raise InputError unless `image` is a finite 3D scalar volume with plausible spacing and CT intensities."""
    _check_shape(image, name)
    _check_spacing(image, name)
    _check_extent(image, name)
    _check_axes_perpendicular(image, name)
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise InputError(f"{name}: {bad} voxels are NaN or infinite; the image is corrupt or was saved wrongly")
    sample = _subsample(array)  # the whole array only when the strided view is constant: cheap for real scans
    if sample.min() == sample.max() and array.min() == array.max():
        # a blank export or failed reconstruction: "nothing found" would look like a result
        raise InputError(f"{name}: every voxel has the same value ({sample.min():g}); the image is blank, there is "
                         "nothing to segment")
    problem = _ct_problem(sample)
    if problem is None:
        return
    if not allow_non_ct:
        raise InputError(f"{name}: {problem}; if this really is what you want to segment, "
                         "pass --allow-non-ct (allow_non_ct=True)")
    warnings.warn(f"{name}: {problem}; segmenting anyway because allow_non_ct is set, expect poor results",
                  NonCTWarning, stacklevel=3)


def dicom_source_files(image_or_path: sitk.Image | str | os.PathLike,
                       series_uid: str | None = None) -> list[Path] | None:
    """The DICOM files (in slice order) an image was read from, or None when it did not come from DICOM.

    Args:
        image_or_path: the image returned by `read_image` (it remembers its files), or a folder / file path.
        series_uid: for a folder, the series `read_image` was given.
    """
    if isinstance(image_or_path, sitk.Image):
        if not image_or_path.HasMetaDataKey(DICOM_FILES_KEY):
            return None
        return [Path(f) for f in json.loads(image_or_path.GetMetaData(DICOM_FILES_KEY))] or None
    path = Path(image_or_path)
    if not (path.is_dir() or (path.is_file() and is_dicom_file(path))):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DicomSeriesWarning)  # read_image says which series it used
            return find_series(path, series_uid).files
    except InputError:
        return None


# --- reading ---------------------------------------------------------------------------------------------


def _read_file(path: Path) -> sitk.Image:
    if is_dicom_without_preamble(path):  # GDCM would read it as a lone 2D slice, or not at all
        raise without_preamble_error(path, f"{path} is")
    check_file_header(path)  # declared size, voxel type and spacing, before ITK allocates anything
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with capture_itk_output() as log:
            image = reader.Execute()
    except RuntimeError as e:
        raise InputError(read_error(path, e, log.text)) from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]  # a 4D file with one time point is just a 3D volume
    if path.name.lower().endswith((".nii", ".nii.gz")) and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        _check_nifti_finite(path)
    return image


def _check_nifti_finite(path: Path) -> None:
    """ITK's NIfTI reader silently turns NaN and inf into 0, so look at the stored values themselves."""
    import nibabel

    data = np.asanyarray(nibabel.load(path).dataobj)
    if not np.isfinite(data).all():
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise InputError(f"{path}: {bad} voxels are NaN or infinite; the image is corrupt or was saved wrongly")


def read_error(path: Path, error: RuntimeError, log: str = "") -> str:
    """One line for a failed ITK read: `error` and what ITK printed meanwhile (`log`, see itk_log)."""
    text = f"{error}\n{log}"
    if "data not read completely" in text or "fread got only" in text or "but received" in text:
        return f"{path} is truncated: its voxel data end before the size its header declares; copy or download " \
               "the file again"
    if "Zero-valued spacing" in text:
        return f"{path}: the voxel spacing is zero along an axis; the file's geometry header is broken"
    if "Unable to determine ImageIO" in text:
        return f"cannot read {path}: unknown or unsupported format (expected {_SUPPORTED})"
    last = next((line.strip() for line in reversed(str(error).splitlines()) if line.strip()), "unknown error")
    return f"cannot read {path}: {_ITK_PREFIX.sub('', last)}"


def _read_dicom(path: Path, series_uid: str | None) -> tuple[sitk.Image, DicomStack]:
    stack = find_series(path, series_uid, supported=_SUPPORTED)
    image = read_stack(stack)
    # Remember the source files so the DICOM SEG writer can reference the instances.
    image.SetMetaData(DICOM_FOLDER_KEY, str(stack.files[0].parent.resolve()))
    image.SetMetaData(DICOM_SERIES_KEY, stack.series_uid)
    image.SetMetaData(DICOM_FILES_KEY, json.dumps([str(f.resolve()) for f in stack.files]))
    return image, stack


def _cast_keep_metadata(image: sitk.Image, pixel_id: int) -> sitk.Image:
    cast = sitk.Cast(image, pixel_id)
    for key in image.GetMetaDataKeys():
        cast.SetMetaData(key, image.GetMetaData(key))
    return cast


# --- checks ----------------------------------------------------------------------------------------------


def _check_shape(image: sitk.Image, name: str) -> None:
    dim, size = image.GetDimension(), image.GetSize()
    if dim == 2:
        raise InputError(f"{name} is a 2D image ({size[0]}x{size[1]}); give a 3D CT volume")
    if dim != 3:
        raise InputError(f"{name} is {dim}D (size {'x'.join(map(str, size))}); give one 3D CT volume "
                         "(e.g. a single time point or phase)")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name} has {image.GetNumberOfComponentsPerPixel()} values per voxel (a colour or vector "
                         "image); a CT has one intensity per voxel")
    thinnest = int(np.argmin(size))
    for axis, n in enumerate(size):
        need = MIN_SLICES if axis == thinnest else MIN_SIZE
        if n < need:
            what = "it is empty" if n == 0 else "a single slice is not a 3D scan" if n == 1 else "too few to segment"
            raise InputError(f"{name} has {n} voxels along {_AXES[axis]} ({what}); a 3D CT needs at least "
                             f"{MIN_SLICES} slices along its thinnest axis and {MIN_SIZE} voxels along the others")


def _check_spacing(image: sitk.Image, name: str) -> None:
    low, high = SPACING_RANGE_MM
    spacing = image.GetSpacing()
    for axis, s in zip(_AXES, spacing):
        if not low <= s <= high:  # also catches NaN
            shown = " x ".join(f"{v:g}" for v in spacing)
            raise InputError(f"{name}: implausible voxel spacing {shown} mm ({s:g} mm along {axis}; expected "
                             f"{low:g} to {high:g} mm); the geometry header is probably wrong")


def _check_extent(image: sitk.Image, name: str) -> None:
    extents = sorted((n * s for n, s in zip(image.GetSize(), image.GetSpacing())), reverse=True)
    if extents[1] > MAX_CROSS_SECTION_MM:
        shown = " x ".join(f"{v:g}" for v in image.GetSpacing())
        raise InputError(f"{name}: the image is {extents[0]:.0f} x {extents[1]:.0f} mm along two axes, wider than any "
                         f"CT's field of view (about {MAX_CROSS_SECTION_MM:.0f} mm); its voxel spacing ({shown} mm) is "
                         "probably wrong in the geometry header")


def _check_axes_perpendicular(image: sitk.Image, name: str) -> None:
    """A sheared grid (a tilted gantry saved as NRRD/MHA): the writers would save the masks on a grid coerced
    to perpendicular axes, where they no longer lie over the image. Refused as a tilted DICOM series is."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    error = float(np.abs(direction.T @ direction - np.eye(3)).max())
    if error > MAX_DIRECTION_ERROR:
        angles = np.degrees(np.arccos(np.clip([direction[:, 0] @ direction[:, 1], direction[:, 0] @ direction[:, 2],
                                               direction[:, 1] @ direction[:, 2]], -1, 1)))
        shown = ", ".join(f"{a:.1f}" for a in angles)
        raise InputError(f"{name}: its voxel axes are not perpendicular (angles {shown} degrees: a sheared grid, "
                         "e.g. a tilted gantry), which our outputs cannot represent; resample it onto a regular grid "
                         "first (e.g. Slicer's Resample Scalar Volume)")


def _subsample(array: np.ndarray, target: int = 2_000_000) -> np.ndarray:
    # A strided view is enough for percentiles and saves seconds on large scans.
    step = max(1, int(round((array.size / target) ** (1 / 3))))
    return array[::step, ::step, ::step]


def _label_map_problem(sample: np.ndarray) -> str | None:
    """Why the image looks like a segmentation (a mask or label map) rather than a scan, or None.

    A scan has hundreds of distinct values at least (CT: air at -1000 up to bone); a label map a few
    small whole numbers, mostly 0 (background). Said before the CT-likeness check, whose "looks like
    MR" would mislead someone who picked the segmentation file beside the CT.
    """
    if sample.min() < 0 or sample.max() > MAX_LABEL_VALUE:
        return None
    values, counts = np.unique(sample, return_counts=True)
    mostly_zero = values[0] == 0 and counts[0] == counts.max()
    if values.size > MAX_LABEL_VALUES or not mostly_zero or (values != np.round(values)).any():
        return None
    return (f"this looks like a segmentation, not a scan ({values.size} distinct whole values from 0 to "
            f"{values[-1]:g}, mostly 0: a mask or label map); give the CT image it was made from")


def _ct_problem(sample: np.ndarray) -> str | None:
    """Why the intensities (a `_subsample` of the image) do not look like CT in Hounsfield units, or None."""
    label_map = _label_map_problem(sample)
    if label_map:
        return label_map
    low, high = np.percentile(sample, [0.5, 99.5])
    air_fat = float(np.count_nonzero(sample < AIR_FAT_HU)) / sample.size
    if high > MAX_P99_HU:
        return (f"intensities do not look like CT in Hounsfield units (99.5th percentile {high:.0f}, above "
                f"{MAX_P99_HU:.0f} HU): raw scanner values, MR, or a wrong rescale")
    if air_fat < MIN_AIR_FAT_FRACTION:
        return (f"intensities do not look like CT in Hounsfield units (0.5-99.5th percentile {low:.0f} to "
                f"{high:.0f}, no air or fat below {AIR_FAT_HU:.0f} HU): this looks like MR or unscaled data")
    return None
