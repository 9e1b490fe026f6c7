"""Find the image series in a DICOM folder and read one as a 3D volume, from pydicom's view of each file.

ITK's series reader lays the slices on an even grid whatever their positions, picks the largest
series silently and trusts the dataset's SOP Class UID. Here every file's header is read with
pydicom and the geometry comes from the files themselves:

- objects that are no cross-sectional image of anatomy (SR, SEG, RT dose, dose reports, DICOMDIR,
  ...), localisers and multi-frame objects are skipped;
- a series is split into stacks of one orientation (a scout inside the series, a reformat saved
  under the same UID); slices of one stack with different matrix sizes (Rows/Columns), frames of
  reference or pixel spacings are refused, naming them;
- the stack used is the one the caller names (`series_uid`), else the one with the most CT slices,
  and a `DicomSeriesWarning` says which when there was a choice;
- slices are ordered by ImagePositionPatient along the slice normal; duplicated positions, a
  sheared stack (gantry tilt), uneven spacing and gaps of more than one slice are refused naming the
  positions; a single missing slice is filled from its two neighbours (see `MAX_FILLED_GAP`), with
  a warning.

Pixels are decoded by pydicom (JPEG 2000 through pylibjpeg-openjpeg, JPEG-LS through pyjpegls, RLE
natively), or by SimpleITK's GDCM for a transfer syntax pydicom has no decoder for here.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from UniversalSegLib.errors import InputError

if TYPE_CHECKING:  # pydicom takes a moment to import: only when a DICOM input is read
    import pydicom

CT_MODALITY = "CT"
# Objects that carry image geometry but are no anatomy to segment: they are skipped like SR documents.
_DERIVED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose Storage (a dose grid on the CT's frame of reference)
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map Storage
}
# Fraction of the slice step (or of the in-plane pixel) a position may deviate from the regular grid
# and still count as on it: scanners round positions to a few decimals, well below this.
POSITION_TOLERANCE = 0.05
# Consecutive missing slices we fill by interpolating the neighbours. One slice: the filled slice is
# the mean of its two neighbours, two steps apart, where the model's own resampling (to its 1.5 mm
# grid) interpolates between slices one step apart anyway: organs, which span many slices, come out
# as they would, and the warning names the position where a small structure may be blurred. Two or
# more: a structure (a vessel branch, a small lesion) can lie entirely in the gap, so we refuse.
# Refusing a one-slice gap as well would turn away series a radiologist reads without a second look.
MAX_FILLED_GAP = 1
# Sideways drift of the slices (in in-plane pixels, over the whole stack) still read as a straight stack:
# orientation cosines written with few decimals drift by a fraction of a pixel; a tilted gantry by tens of mm.
MAX_SHEAR_PIXELS = 0.5
_SHOWN_POSITIONS = 8  # positions named in a refusal


class DicomSeriesWarning(UserWarning):
    """Something about the DICOM series the user should know: which series was used, a filled slice."""


@dataclass
class DicomStack:
    """The files of one series with one orientation and matrix size, in slice order.

    headers: pydicom datasets without pixel data, in the same order as `files`.
    offsets: each slice's position along the slice normal (mm), ascending.
    """

    series_uid: str
    files: list[Path]
    headers: list[pydicom.Dataset] = field(repr=False)
    offsets: np.ndarray = field(repr=False)

    @property
    def modality(self) -> str:
        return str(getattr(self.headers[0], "Modality", "") or "?")

    @property
    def description(self) -> str:
        return str(getattr(self.headers[0], "SeriesDescription", "") or "")

    def summary(self) -> str:
        """`UID (CT, 120 slices, 'Abdomen 1mm')`: how we name a series to the user."""
        text = f"{self.series_uid} ({self.modality}, {len(self.files)} slice{'s' * (len(self.files) != 1)}"
        return f"{text}, '{self.description}')" if self.description else f"{text})"


@dataclass
class _Scan:
    """What a folder holds: image stacks, per reason the number of files skipped, the non-DICOM files and
    the DICOM files whose header could not be parsed (damaged: counted in `skipped` too)."""

    stacks: list[DicomStack]
    skipped: Counter
    other_files: list[Path]
    damaged: list[Path] = field(default_factory=list)


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file (128-byte preamble then "DICM")."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_dicom_without_preamble(path: Path) -> bool:
    """A DICOM dataset without the Part 10 preamble and "DICM" (old ACR-NEMA-style or raw exports): it starts
    with a little-endian group 0008 (or 0002) tag, and pydicom, forced, finds a SOP class or modality in it."""
    import pydicom

    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if len(head) < 4 or head[:2] not in (b"\x08\x00", b"\x02\x00") or is_dicom_file(path):
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return bool(getattr(ds, "SOPClassUID", None) or getattr(ds, "Modality", None))
    except Exception:  # noqa: BLE001 - whatever fails here, it is no DICOM we could name
        return False


def without_preamble_error(path: Path, what: str) -> InputError:
    """The refusal for DICOM files without the Part 10 header (`what`: the file, or "the files of FOLDER")."""
    return InputError(f"{what} DICOM without the Part 10 file header (no 'DICM' preamble, as old or raw exports "
                      "write it), which we do not read; convert it to DICOM Part 10 files first (e.g. dcmtk: "
                      "dcmconv +F IN OUT, or gdcmconv)")


def read_header(path: Path) -> pydicom.Dataset:
    """The file's dataset without pixel data. pydicom's own warnings about damaged files are not shown:
    we classify the file ourselves and say what matters in one line."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=True)


def sop_class_uid(ds: pydicom.Dataset) -> str:
    """The dataset's SOP Class UID, or the file meta's when the dataset's is empty (as anonymisers leave it)."""
    uid = str(getattr(ds, "SOPClassUID", "") or "").strip()
    if not uid and hasattr(ds, "file_meta"):
        uid = str(getattr(ds.file_meta, "MediaStorageSOPClassUID", "") or "").strip()
    return uid


def _skip_reason(ds: pydicom.Dataset) -> str | None:
    """Why a file is not a slice of a cross-sectional image series, or None when it is one."""
    from pydicom.uid import UID

    sop = sop_class_uid(ds)
    if sop in _DERIVED_SOP_CLASSES:
        return UID(sop).name
    image_type = [str(v).upper() for v in (getattr(ds, "ImageType", None) or [])]
    if "LOCALIZER" in image_type:
        return "localiser"
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        return "multi-frame image, e.g. enhanced CT: export it as single-frame slices"
    needed = ("Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
    if all(getattr(ds, name, None) not in (None, "") for name in needed):
        return _geometry_problem(ds)
    name = UID(sop).name if sop else ""
    modality = str(getattr(ds, "Modality", "") or "")
    if name and name != sop:
        return name
    return f"{modality} object without image geometry" if modality else "DICOM file without image data"


def _cut_short(ds: pydicom.Dataset) -> bool:
    """An image file whose dataset ends before its identifying attributes: pydicom reads a file cut short
    inside its header without complaint, and returns only what was there (often just the file meta)."""
    from pydicom.uid import UID

    sop = sop_class_uid(ds)
    is_image = sop not in _DERIVED_SOP_CLASSES and UID(sop).name.endswith(" Image Storage")
    return is_image and not str(getattr(ds, "SeriesInstanceUID", "") or "").strip()


def _numbers(value, count: int) -> np.ndarray | None:
    try:
        numbers = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return numbers if numbers.shape == (count,) and np.isfinite(numbers).all() else None


def _geometry_problem(ds: pydicom.Dataset) -> str | None:
    """None when position, orientation and pixel spacing are numbers of the right count and shape."""
    position, orientation = _numbers(ds.ImagePositionPatient, 3), _numbers(ds.ImageOrientationPatient, 6)
    spacing = _numbers(ds.PixelSpacing, 2)
    if position is None or orientation is None or spacing is None or (spacing <= 0).any():
        return "image with broken geometry: position, orientation or pixel spacing"
    if np.linalg.norm(np.cross(orientation[:3], orientation[3:])) < 0.5:  # row and column directions not at 90 deg
        return "image with broken geometry: orientation"
    return None


def _stack_key(ds: pydicom.Dataset) -> tuple:
    """Series and orientation. Not the matrix size: a slice whose Rows/Columns differ from the rest of its
    stack is refused by `slice_grid` (naming the file) rather than shown as a second series with the same UID."""
    orientation = tuple(round(float(v), 3) for v in ds.ImageOrientationPatient)
    return str(getattr(ds, "SeriesInstanceUID", "") or ""), orientation


def scan_folder(folder: Path) -> _Scan:
    """Read every file's header in `folder` (not its subfolders) and group the image slices into stacks."""
    groups: dict[tuple, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    skipped: Counter = Counter()
    other: list[Path] = []
    damaged: list[Path] = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if not is_dicom_file(path):
            other.append(path)
            continue
        try:
            ds = read_header(path)
        except Exception:  # noqa: BLE001 - a damaged header is skipped like any other non-image file
            ds = None
        if ds is None or _cut_short(ds):
            skipped["unreadable DICOM file"] += 1
            damaged.append(path)
            continue
        reason = _skip_reason(ds)
        if reason:
            skipped[reason] += 1
        else:
            groups[_stack_key(ds)].append((path, ds))
    stacks = [_ordered_stack(key[0], members) for key, members in groups.items()]
    return _Scan(stacks, skipped, other, damaged)


def _normal(ds: pydicom.Dataset) -> np.ndarray:
    orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
    return np.cross(orientation[:3], orientation[3:])


def _ordered_stack(series_uid: str, members: list[tuple[Path, pydicom.Dataset]]) -> DicomStack:
    normal = _normal(members[0][1])
    offsets = np.array([np.dot([float(v) for v in ds.ImagePositionPatient], normal) for _, ds in members])
    order = np.argsort(offsets, kind="stable")
    return DicomStack(series_uid, [members[i][0] for i in order], [members[i][1] for i in order], offsets[order])


def _no_series_error(folder: Path, scan: _Scan, supported: str) -> InputError:
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if subfolders and not scan.skipped:
        return InputError(f"{folder} is a folder without a DICOM series in it (subfolders such as {subfolders[0]} "
                          "are not searched); give the folder that holds the series' files")
    if not scan.skipped and not scan.other_files:
        return InputError(f"{folder} is a folder without a DICOM series (it is empty); give a DICOM series "
                          f"folder or an image file ({supported})")
    if not scan.skipped and any(is_dicom_without_preamble(p) for p in scan.other_files[:5]):
        return without_preamble_error(folder, f"{folder} holds")
    if not scan.skipped:
        example = scan.other_files[0].name
        return InputError(f"{folder} is a folder without a DICOM series: none of its {len(scan.other_files)} files "
                          f"(e.g. {example}) is a DICOM file; give a DICOM series folder or an image file "
                          f"({supported})")
    found = "; ".join(f"{reason} ({n} file{'s' * (n > 1)})" for reason, n in scan.skipped.most_common())
    # e.g. a CD export: a DICOMDIR at the top, the series in subfolders
    below = (f"; subfolders such as {subfolders[0]} are not searched: give the folder that holds a series' files "
             "(`universalseg cohort` finds every series below a folder)") if subfolders else ""
    return InputError(f"{folder} is a folder without a DICOM image series: it holds only {found}{below}")


def _choose(folder: Path, stacks: list[DicomStack], series_uid: str | None) -> DicomStack:
    if series_uid:
        matching = [s for s in stacks if s.series_uid == series_uid.strip()]
        if not matching:
            listed = "; ".join(s.summary() for s in stacks)
            raise InputError(f"series {series_uid} is not among the image series of {folder}: {listed}")
        stacks = matching
    # CT first, then the most slices; ties by UID so the choice does not depend on file order
    ranked = sorted(stacks, key=lambda s: (s.modality != CT_MODALITY, -len(s.files), s.series_uid))
    chosen = ranked[0]
    if len(ranked) > 1:
        others = "; ".join(s.summary() for s in ranked[1:])
        how = "the named series" if series_uid else "the one with the most CT slices" if (
            chosen.modality == CT_MODALITY) else "the one with the most slices"
        pick = "" if series_uid else "; choose another with --series UID (series_uid= in Python)"
        warnings.warn(f"{folder} holds {len(ranked)} image series; using {chosen.summary()}, {how}; "
                      f"also there: {others}{pick}", DicomSeriesWarning, stacklevel=4)
    return chosen


def find_series(path: Path, series_uid: str | None = None, supported: str = "an image file") -> DicomStack:
    """The DICOM stack to read for `path` (a folder, or one file of a series), warning when there was a choice.

    Args:
        path: a folder holding DICOM files, or one DICOM file (its folder is searched for its series).
        series_uid: the SeriesInstanceUID to use; None picks the CT series with the most slices.
        supported: the other input formats, named in the error for a folder without DICOM.
    Raises InputError when there is no image series, or none with `series_uid`.
    """
    folder = path if path.is_dir() else path.parent
    scan = scan_folder(folder)
    if scan.damaged and scan.stacks:
        # A slice cut short inside its header cannot be told from any other file: read without it, the
        # series would silently lose a slice at its end, or get it "filled" in its middle.
        more = f" (and {len(scan.damaged) - 1} more)" if len(scan.damaged) > 1 else ""
        raise InputError(f"{scan.damaged[0]}{more} is a damaged DICOM file (its header is unreadable or lacks the "
                         f"series UID: cut short?), so the series in {folder} may be incomplete; copy the folder "
                         "again, or remove the file if it is not part of the series")
    if path.is_file():
        holding = [s for s in scan.stacks if path in s.files]
        if not holding:
            try:
                reason = _skip_reason(read_header(path))
            except Exception:  # noqa: BLE001 - any parse failure means the same to the user
                reason = "damaged DICOM file"
            raise InputError(f"{path} is not a slice of an image series ({reason or 'no image'}); give the CT "
                             "series folder")
        series_uid = series_uid or holding[0].series_uid
    if not scan.stacks:
        raise _no_series_error(folder, scan, supported)
    return _choose(folder, scan.stacks, series_uid)


# --- geometry ----------------------------------------------------------------------------------------------


@dataclass
class SliceGrid:
    """Where each file's slice goes on a regular grid: `index[i]` for file i; `missing` grid slices have none."""

    step: float
    size: int
    index: list[int]
    missing: list[int]


def _shown(values: Sequence[float]) -> str:
    text = [f"{v:.2f}" for v in values[:_SHOWN_POSITIONS]]
    return ", ".join(text) + (f", ... ({len(values)} in all)" if len(values) > _SHOWN_POSITIONS else "")


def _check_not_sheared(stack: DicomStack) -> None:
    """Every slice's corner must lie on the normal through the first one (no gantry tilt, no sheared stack)."""
    normal = _normal(stack.headers[0])
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in stack.headers])
    sideways = positions - positions[0] - np.outer(stack.offsets - stack.offsets[0], normal)
    drift = float(np.linalg.norm(sideways, axis=1).max())
    pixel = min(float(v) for v in stack.headers[0].PixelSpacing)
    if drift > MAX_SHEAR_PIXELS * pixel:
        raise InputError(f"DICOM series {stack.series_uid}: the slices are shifted sideways from one to the next "
                         f"(up to {drift:.2f} mm: a tilted gantry or a sheared stack), which a 3D grid cannot "
                         "represent; resample it first (e.g. Slicer's DICOM module, acquisition geometry "
                         "regularization)")


def _matrix(ds: pydicom.Dataset) -> tuple[int, int]:
    return int(ds.Rows), int(ds.Columns)


def _check_one_matrix(stack: DicomStack) -> None:
    """Every slice must have the same Rows and Columns: a slice that differs has a wrong header or belongs to
    another series (ITK's series reader stops with "Size mismatch"; GDCM's series helper splits it off)."""
    sizes = Counter(_matrix(ds) for ds in stack.headers)
    if len(sizes) == 1:
        return
    (rows, columns), usual = sizes.most_common(1)[0]
    odd = [(f, _matrix(ds)) for f, ds in zip(stack.files, stack.headers) if _matrix(ds) != (rows, columns)]
    more = f" (and {len(odd) - 1} more slice{'s' * (len(odd) > 2)})" if len(odd) > 1 else ""
    raise InputError(f"DICOM series {stack.series_uid}: {odd[0][0]}{more} is {odd[0][1][0]}x{odd[0][1][1]} pixels "
                     f"(Rows x Columns) where the other {usual} slices are {rows}x{columns}; its header is wrong or "
                     "it belongs to another series; remove it from the folder or export the series again")


def _check_one_frame_of_reference(stack: DicomStack) -> None:
    """All slices must share one FrameOfReferenceUID: a scanner never mixes frames within a series, so slices
    in two frames are two acquisitions (or edited files) whose positions cannot be stacked into one volume.
    Slices without the attribute are left to the DICOM SEG check (`dicom_seg_problem`)."""
    frames = Counter(str(getattr(ds, "FrameOfReferenceUID", "") or "").strip() for ds in stack.headers)
    frames.pop("", None)
    if len(frames) > 1:
        shown = ", ".join(f"{uid} ({n} slice{'s' * (n > 1)})" for uid, n in frames.most_common())
        raise InputError(f"DICOM series {stack.series_uid}: its slices lie in {len(frames)} frames of reference "
                         f"({shown}); a scanner never mixes frames within a series, so the folder mixes "
                         "acquisitions under one series UID; keep only the slices of one frame in the folder")


def _check_one_pixel_spacing(stack: DicomStack) -> None:
    """Every slice must have the first one's PixelSpacing: the volume takes it for all of them."""
    spacings = Counter(tuple(round(float(v), 4) for v in ds.PixelSpacing) for ds in stack.headers)
    if len(spacings) > 1:
        shown = ", ".join(f"{r:g} x {c:g} mm ({n} slice{'s' * (n > 1)})" for (r, c), n in spacings.most_common())
        raise InputError(f"DICOM series {stack.series_uid}: its slices have different pixel spacings ({shown}), "
                         "as when reconstructions of different fields of view share a series UID; keep only one "
                         "of them in the folder")


def slice_grid(stack: DicomStack) -> SliceGrid:
    """Place the stack's slices on a regular grid from their positions, or raise InputError naming them.

    A single missing slice (up to `MAX_FILLED_GAP`) stays a grid slice without a file; duplicated
    positions, uneven spacing and longer gaps are refused.
    """
    offsets = stack.offsets
    name = f"DICOM series {stack.series_uid}"
    _check_one_matrix(stack)
    _check_one_frame_of_reference(stack)
    _check_one_pixel_spacing(stack)
    if len(offsets) == 1:
        return SliceGrid(float(getattr(stack.headers[0], "SliceThickness", 0) or 1.0), 1, [0], [])
    _check_not_sheared(stack)
    gaps = np.diff(offsets)
    pixel = min(float(v) for v in stack.headers[0].PixelSpacing)
    if gaps.min() <= POSITION_TOLERANCE * pixel:
        at = float(offsets[int(np.argmin(gaps))])
        raise InputError(f"{name}: two slices lie at the same position ({at:.2f} mm along the slice normal); the "
                         "folder mixes several acquisitions under one series UID; keep only one in the folder")
    smallest = gaps.min()
    step = float(np.median(gaps[gaps <= 1.5 * smallest]))
    index = np.rint((offsets - offsets[0]) / step).astype(int)
    step = float((offsets[-1] - offsets[0]) / index[-1])  # refit on the whole extent
    off_grid = np.abs((offsets - offsets[0]) / step - index) > POSITION_TOLERANCE
    if off_grid.any():
        raise InputError(f"{name}: uneven slice spacing (gaps of {_shown(sorted(set(np.round(gaps, 2))))} mm); "
                         f"slice positions along the normal: {_shown(list(offsets))} mm; resample it onto a "
                         "regular grid first (e.g. Slicer's DICOM module, acquisition geometry regularization)")
    missing = sorted(set(range(int(index[-1]) + 1)) - set(index.tolist()))
    longest = max(np.diff(index)) - 1
    if longest > MAX_FILLED_GAP:
        edges = [(float(offsets[i]), float(offsets[i + 1])) for i in np.flatnonzero(np.diff(index) > 1)]
        shown = ", ".join(f"between {a:.2f} and {b:.2f} mm" for a, b in edges[:_SHOWN_POSITIONS])
        raise InputError(f"{name}: {len(missing)} slices are missing ({shown} along the slice normal, "
                         f"{step:.2f} mm apart elsewhere; gaps of at most {MAX_FILLED_GAP} slice are filled); "
                         "the series is incomplete, export it again")
    return SliceGrid(step, int(index[-1]) + 1, index.tolist(), missing)


# --- pixels ----------------------------------------------------------------------------------------------


def _rescale(ds: pydicom.Dataset) -> tuple[float, float]:
    return float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)


def _pydicom_can_decode(ds: pydicom.Dataset) -> bool:
    from pydicom.pixels import get_decoder

    try:
        return get_decoder(ds.file_meta.TransferSyntaxUID).is_available
    except (NotImplementedError, AttributeError):  # an unknown transfer syntax, or no file meta at all
        return False


def _slice_values(path: Path) -> np.ndarray:
    """One slice in stored units times RescaleSlope plus RescaleIntercept (HU for CT), as float32.

    pydicom decodes what it has a decoder for here; SimpleITK's GDCM the rest (e.g. JPEG Lossless).
    When pydicom's decoder fails the data is damaged: refused at once, as GDCM would only print its
    own complaints about the same bytes before failing too.
    """
    import pydicom

    with warnings.catch_warnings():  # e.g. J2K bit depth notes: pydicom corrects them itself
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        if not _pydicom_can_decode(ds):
            return _slice_values_itk(path, ds)
        try:
            raw = ds.pixel_array
        except Exception as e:  # noqa: BLE001 - any decoder failure: the pixel data is damaged
            raise InputError(f"cannot decode the pixels of {path} ({_syntax_name(ds)}): "
                             f"{_one_line(e)}; the file is damaged") from None
    slope, intercept = _rescale(ds)
    return raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _syntax_name(ds: pydicom.Dataset) -> str:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return syntax.name if syntax else "no transfer syntax"


def _one_line(error: Exception) -> str:
    """pydicom lists each plugin's failure under a heading line: keep the reasons, on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.endswith(":")]
    return "; ".join(reasons or lines) or type(error).__name__


def _slice_values_itk(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        image = reader.Execute()  # GDCM applies the rescale itself
    except RuntimeError as e:
        raise InputError(f"cannot decode the pixels of {path} ({_syntax_name(ds)}): {_one_line(e)}") from None
    return sitk.GetArrayFromImage(image).reshape(image.GetSize()[1], image.GetSize()[0]).astype(np.float32)


def _fits_int16(values: np.ndarray) -> bool:
    return bool(values.min() >= -32768 and values.max() <= 32767 and np.array_equal(values, np.round(values)))


def _volume(stack: DicomStack, grid: SliceGrid) -> np.ndarray:
    """The slices on the grid: int16 when the rescale gives whole numbers in range (CT in HU nearly always,
    half the memory of float32 and what ITK gave), else float32."""
    rows, columns = int(stack.headers[0].Rows), int(stack.headers[0].Columns)
    whole = all(float(v).is_integer() for ds in stack.headers for v in _rescale(ds))
    volume = np.empty((grid.size, rows, columns), dtype=np.int16 if whole else np.float32)
    for path, k in zip(stack.files, grid.index):
        values = _slice_values(path)
        if values.shape != (rows, columns):
            raise InputError(f"{path}: its pixels are {'x'.join(map(str, values.shape))}, its header says "
                             f"{rows}x{columns}; the file is damaged")
        if volume.dtype == np.int16 and not _fits_int16(values):
            volume = volume.astype(np.float32)  # rare: values beyond int16 or fractional after all
        volume[k] = values
    for k in grid.missing:  # both neighbours exist: gaps are at most MAX_FILLED_GAP == 1 slice
        # rounded: whole HU keep the volume int16, and a 0.5 HU step is far below CT noise
        volume[k] = np.round((volume[k - 1].astype(np.float32) + volume[k + 1]) / 2)
    return volume


def read_stack(stack: DicomStack) -> sitk.Image:
    """The stack as a SimpleITK image in LPS with its geometry taken from the slice positions."""
    grid = slice_grid(stack)
    if grid.missing:
        where = ", ".join(f"{stack.offsets[0] + k * grid.step:.2f}" for k in grid.missing[:_SHOWN_POSITIONS])
        warnings.warn(f"DICOM series {stack.series_uid}: {len(grid.missing)} missing slice"
                      f"{'s' * (len(grid.missing) > 1)} at {where} mm along the slice normal, filled by "
                      "interpolating the neighbouring slices; masks there are interpolated too",
                      DicomSeriesWarning, stacklevel=3)
    first = stack.headers[0]
    orientation = np.array([float(v) for v in first.ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    image = sitk.GetImageFromArray(_volume(stack, grid))
    image.SetSpacing((column_spacing, row_spacing, grid.step))
    image.SetOrigin(tuple(float(v) for v in first.ImagePositionPatient))
    image.SetDirection(tuple(np.column_stack([orientation[:3], orientation[3:], _normal(first)]).ravel()))
    return image


def source_headers(source: Sequence[str | os.PathLike] | DicomStack) -> tuple[list[Path], list[pydicom.Dataset]]:
    """(files, headers) of a DICOM source: a `DicomStack` keeps the headers its folder scan read (so a
    series is read once per run); a list of files has them read here."""
    if isinstance(source, DicomStack):
        return source.files, source.headers
    files = [Path(f) for f in source]
    return files, [read_header(f) for f in files]


def dicom_seg_problem(source: Sequence[str | os.PathLike] | DicomStack) -> str | None:
    """Why a DICOM SEG cannot be derived from these source files (what the SEG IOD needs from them), or None.

    Args:
        source: the source files, or the `DicomStack` they were read as.
    An empty dataset SOP Class UID is no problem: the writer takes it from the file meta.
    """
    files, headers = source_headers(source) if source else ([], [])
    if not files:
        return "the input was not a DICOM series"
    for attribute, what in (("StudyInstanceUID", "Study Instance UID"), ("SeriesInstanceUID", "Series Instance UID"),
                            ("SOPInstanceUID", "SOP Instance UID"), ("FrameOfReferenceUID", "Frame of Reference UID")):
        lacking = [Path(f).name for f, ds in zip(files, headers) if not str(getattr(ds, attribute, "") or "").strip()]
        if lacking:
            return (f"the source DICOM series has no {what} ({len(lacking)} of {len(files)} files, e.g. {lacking[0]}),"
                    " which a DICOM SEG must reference")
    if len({str(ds.FrameOfReferenceUID) for ds in headers}) > 1:
        return "the source DICOM slices carry different Frame of Reference UIDs, so one SEG cannot reference them"
    lacking = [Path(f).name for f, ds in zip(files, headers) if not sop_class_uid(ds)]
    if lacking:
        return (f"the source DICOM file {lacking[0]} has no SOP Class UID, neither in the dataset nor in its file "
                "meta header")
    return None
