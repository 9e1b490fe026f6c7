"""Check an image file's header against the file itself before any voxel is read.

ITK allocates the whole image the header declares before reading a byte of it, and its NIfTI
reader fills data that is missing with zeros. So a truncated download segments "fine" (with the
missing part read as air), and a corrupt header declaring 32767^3 voxels asks the OS for 64 TiB.
Here the declared size is compared with what the file holds, and the voxel type and spacing are
checked, from the header alone (nibabel for NIfTI, ITK's ReadImageInformation for the others).

Cost: reading the header, plus for .nii.gz the gzip trailer (4 bytes, the uncompressed size mod
2^32). Only when that trailer disagrees with the header (truncated file, several gzip members,
padding) is the file decompressed once, in chunks and without keeping the data, to count its bytes.
"""

from __future__ import annotations

import gzip
import io
import math
import re
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from UniversalSegLib.errors import InputError

# Deflate never compresses more than about 1032:1 (RFC 1951 limit), so a compressed file declaring
# more than that many times its size is a corrupt header or a truncated file, whatever its content.
MAX_DEFLATE_RATIO = 1032
# qform and sform may differ by rounding (the qform is a float32 quaternion) and by a sform's shear,
# which ITK drops; beyond half a voxel at some corner of the image they describe different placements.
MAX_FORM_DISAGREEMENT_VOXELS = 0.5
_CHUNK = 1 << 20  # bytes decompressed at a time when counting a gzip stream
_NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr")
# The one NRRD space ITK reports for a patient frame: it converts RAS and LAS into it on read (NrrdImageIO).
_NRRD_PATIENT_SPACE = "left-posterior-superior"
_AXIS_OF = {"R": "x", "L": "x", "A": "y", "P": "y", "I": "z", "S": "z"}  # MetaIO orientation letters
_COMPLEX = {sitk.sitkComplexFloat32: "complex64", sitk.sitkComplexFloat64: "complex128"}


def check_file_header(path: Path) -> None:
    """Raise InputError when `path`'s header declares an unsupported voxel type, a zero or non-finite
    voxel size, or more data than the file holds. Reads the header only (see the module docstring)."""
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes); the copy or download probably failed")
    if path.name.lower().endswith(_NIFTI_SUFFIXES):
        _check_nifti(path)
    else:
        _check_itk_header(path)


# --- NIfTI (nibabel parses the header; nothing else is read) ----------------------------------------------


def _nifti_header(path: Path):
    """The NIfTI-1 or NIfTI-2 header of `path` (parsed without nibabel's checks), or None for other files."""
    import nibabel

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            block = f.read(nibabel.Nifti2Header.sizeof_hdr)
    except (OSError, EOFError, zlib.error):
        return None  # not gzip after all, or cut before the header ends: ITK's own error says so
    for cls in (nibabel.Nifti1Header, nibabel.Nifti2Header):
        if len(block) >= cls.sizeof_hdr and cls.may_contain_header(block[:cls.sizeof_hdr]):
            # The fixed header alone: given the bytes after it, nibabel would parse the extensions
            # (label names, provenance) and fail on the part our block cut off.
            return cls.from_fileobj(io.BytesIO(block[:cls.sizeof_hdr]), check=False)
    return None


def _voxel_type(path: Path, code: int) -> np.dtype:
    """The numpy type of NIfTI datatype `code`, or InputError when it is no CT intensity type."""
    from nibabel.nifti1 import data_type_codes

    if code not in data_type_codes.code:
        raise InputError(f"{path}: the NIfTI header's voxel type (datatype {code}) is not one NIfTI defines; the "
                         "header is corrupt")
    label, dtype = data_type_codes.label[code], data_type_codes.dtype[code]
    if dtype.kind == "c":
        problem = f"complex voxels ({label}), e.g. raw MR or Fourier data"
    elif dtype.fields is not None:
        problem = f"colour voxels ({label})"
    elif code == 1:
        problem = "1-bit voxels (a binary mask, not a CT)"
    elif dtype.kind not in "iuf" or dtype.itemsize > 8:
        problem = f"voxels of type {label}, which we cannot read"
    else:
        return dtype
    raise InputError(f"{path} has {problem}; a CT has one real (integer or float) intensity per voxel")


def _check_nifti(path: Path) -> None:
    single = path.name.lower().endswith((".nii", ".nii.gz"))
    data_file = path if single else _image_file_of_pair(path)  # also for Analyze headers, read by ITK too
    header = _nifti_header(path)
    if header is None:
        return
    if header.sizeof_hdr == 540:
        raise InputError(f"{path} is a NIfTI-2 file, which our reader (ITK) cannot read; save it as NIfTI-1, e.g. "
                         "nibabel.save(nibabel.Nifti1Image(img.dataobj, img.affine), 'ct.nii.gz')")
    dtype = _voxel_type(path, int(header["datatype"]))
    ndim = int(header["dim"][0])
    if not 1 <= ndim <= 7:
        raise InputError(f"{path}: the NIfTI header's dimension count is {ndim}; the header is corrupt")
    shape = [int(n) for n in header["dim"][1:1 + ndim]]
    if min(shape) < 0:
        raise InputError(f"{path}: the NIfTI header declares a negative size ({'x'.join(map(str, shape))}); the "
                         "header is corrupt")
    spacing = [float(v) for v in header["pixdim"][1:1 + min(ndim, 3)]]
    _check_spacing(path, spacing, "voxel spacing (NIfTI pixdim)", allow_negative=True)
    _check_size(path, data_file, shape, dtype.name, math.prod(shape) * dtype.itemsize, int(header["vox_offset"]))
    _check_orientation(path, header, shape)


def _check_orientation(path: Path, header, shape: list[int]) -> None:
    """InputError when the header does not say unambiguously where the patient's left, front and head are.

    Without a qform or sform (both codes 0) ITK lays the voxels out on bare axes (a CT then reaches
    the model mirrored and turned: measured on the sample, liver 19 ml instead of 1039 ml). When both
    are set but disagree, readers differ: ITK (our reader) took the qform, nibabel, FSL and most
    tools take the sform. Either way the masks could be mirrored without a sign, so we refuse.
    """
    qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
    if qform_code <= 0 and sform_code <= 0:
        raise InputError(f"{path}: the NIfTI header has no orientation (qform_code and sform_code are 0), so "
                         "left/right and head/feet are unknown and the masks could come out mirrored; write the "
                         "true voxel-to-RAS affine into it (nibabel: img.set_sform(affine, code=1))")
    if qform_code <= 0 or sform_code <= 0 or len(shape) < 3:
        return
    # The two affines applied to the volume's corner voxels: how far apart they put the image
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)]).T
    apart = float(np.linalg.norm((header.get_qform() - header.get_sform()) @ corners, axis=0).max())
    voxel = min(abs(float(v)) for v in header["pixdim"][1:4])
    if apart > MAX_FORM_DISAGREEMENT_VOXELS * voxel:
        raise InputError(f"{path}: the NIfTI header's two orientations (qform and sform) disagree, placing the "
                         f"image up to {apart:.0f} mm apart; readers differ on which one to use, so the masks "
                         "could come out mirrored or shifted; keep the right one (nibabel: "
                         "img.set_qform(img.get_sform()), or the other way round)")


def _check_spacing(path: Path, spacing, what: str, allow_negative: bool = False) -> None:
    """InputError for a zero or non-finite spacing (and a negative one unless allowed: NIfTI's pixdim sign
    is no geometry). Otherwise-odd spacings are left to the plausibility check after reading."""
    for axis, value in zip("xyzt", spacing):
        if math.isfinite(value) and (value > 0 or (allow_negative and value < 0)):
            continue
        problem = "zero" if value == 0 else "not a number" if not math.isfinite(value) else f"negative ({value:g})"
        shown = " x ".join(f"{v:g}" for v in spacing)
        silently = " (ITK would silently read 1 mm)" if "pixdim" in what and value == 0 else ""
        raise InputError(f"{path}: the {what} is {problem} along {axis} ({shown} mm); the file's geometry header "
                         f"is broken{silently}")


def _image_file_of_pair(header_file: Path) -> Path:
    for suffix in (".img", ".img.gz"):
        candidate = header_file.with_name(header_file.name[: -len(".hdr")] + suffix)
        if candidate.exists():
            return candidate
    raise InputError(f"cannot read {header_file}: its image file {header_file.stem}.img is missing beside it "
                     "(a .hdr/.img pair needs both)")


# --- NRRD, MetaImage (ITK reads the header only) -----------------------------------------------------------


def _check_itk_header(path: Path) -> None:
    from UniversalSegLib.io.image import read_error
    from UniversalSegLib.io.itk_log import capture_itk_output

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with capture_itk_output() as log:
            reader.ReadImageInformation()
            keys = reader.GetMetaDataKeys()
            if "ITK_InputFilterName" in keys and reader.GetMetaData("ITK_InputFilterName") == "NrrdImageIO":
                # inside the capture: newer ITKs warn "NRRD space ... is not converted to LPS", which our
                # refusal says in full
                _check_nrrd_space(path, reader.GetMetaData("NRRD_space") if "NRRD_space" in keys else None)
        if reader.GetDimension() == 3 and path.name.lower().endswith((".mha", ".mhd")):
            _check_metaimage_orientation(path, reader.GetDirection())
    except RuntimeError as e:
        raise InputError(read_error(path, e, log.text)) from None
    pixel = reader.GetPixelID()
    if pixel in _COMPLEX:
        raise InputError(f"{path} has complex voxels ({_COMPLEX[pixel]}), e.g. raw MR or Fourier data; a CT has "
                         "one real (integer or float) intensity per voxel")
    if reader.GetNumberOfComponents() != 1:  # as check_image says it, but before the voxels are read
        raise InputError(f"{path} has {reader.GetNumberOfComponents()} values per voxel (a colour or vector "
                         "image); a CT has one intensity per voxel")
    _check_spacing(path, reader.GetSpacing(), "voxel spacing")
    data_file = _detached_data_file(path) or path
    if data_file.exists():
        component = sitk.Image([1] * reader.GetDimension(), pixel).GetSizeOfPixelComponent() if pixel >= 0 else 1
        declared = math.prod(reader.GetSize()) * reader.GetNumberOfComponents() * component
        # Only the compression bound: ITK itself reports a short raw file (see read_error).
        _check_size(path, data_file, list(reader.GetSize()), sitk.GetPixelIDValueAsString(pixel), declared,
                    compressed_only=True)


def _check_nrrd_space(path: Path, space: str | None) -> None:
    """InputError unless the NRRD's `space` names the patient's axes (ITK's `NRRD_space` after reading).

    ITK's NrrdImageIO turns right-anterior-superior and left-anterior-superior (and their short names
    RAS, LAS) into LPS on read and then reports `left-posterior-superior`. Every other space it takes
    verbatim as if it were LPS: scanner-xyz (ACR/NEMA 2.0's scanner frame), 3D-right-handed and
    3D-left-handed say nothing about where the patient's left, back and head are, so the masks could come
    out mirrored. Without a `space` ITK lays the voxels on bare axes (only `spacings`) or takes
    `space directions` (given with `space dimension`) as LPS, again without knowing.
    """
    fix = ("if the axes are DICOM's patient frame, set `space: left-posterior-superior` (or "
           "`right-anterior-superior` if they are RAS, as NIfTI's)")
    if space == _NRRD_PATIENT_SPACE:
        return
    if space is not None:
        raise InputError(f"{path}: the NRRD header's space is '{space}', which does not say where the patient's "
                         "left, back and head are (our reader would take its axes as LPS, so the masks could come "
                         f"out mirrored); {fix}")
    if _nrrd_header_field(path, "space dimension") is not None:
        raise InputError(f"{path}: the NRRD header has 'space directions' but no 'space' (only 'space dimension'), "
                         "so it does not say which patient axes the directions are in and the masks could come "
                         f"out mirrored; {fix} in place of 'space dimension'")
    # only "spacings": ITK lays the voxels on bare axes, as for a NIfTI without qform and sform
    raise InputError(f"{path}: the NRRD header has no orientation (no 'space' field, no 'space directions'), "
                     "so left/right and head/feet are unknown and the masks could come out mirrored; write "
                     "them into it (e.g. space: left-posterior-superior)")


def _metaimage_orientation(direction: tuple[float, ...]) -> str:
    """The MetaIO AnatomicalOrientation code ITK writes for an LPS `direction` (row-major 3 x 3): per voxel
    axis, the side it comes FROM along its dominant patient axis (identity: "RAI")."""
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    code = ""
    for axis in matrix.T:
        j = int(np.argmax(np.abs(axis)))
        code += ("RL", "AP", "IS")[j][0 if axis[j] > 0 else 1]
    return code


def _check_metaimage_orientation(path: Path, direction: tuple[float, ...]) -> None:
    """InputError when a MetaImage header's AnatomicalOrientation contradicts its TransformMatrix.

    ITK places the voxels by TransformMatrix (identity when absent) and ignores AnatomicalOrientation, so
    a header whose orientation field says another orientation (written by hand or by a tool that sets
    only that field) would be read mirrored without a word. "???" and malformed codes are ignored.
    """
    header = re.split(r"^\s*ElementDataFile\s*=", _text_head(path), maxsplit=1, flags=re.MULTILINE)[0]
    found = re.search(r"^\s*AnatomicalOrientation\s*=\s*(\S+)\s*$", header, re.MULTILINE)
    stated = found.group(1).upper() if found else ""
    if len(stated) != 3 or sorted(_AXIS_OF.get(c, "?") for c in stated) != ["x", "y", "z"]:
        return
    placed = _metaimage_orientation(direction)
    if stated != placed:
        matrix = "its TransformMatrix" if re.search(r"^\s*(TransformMatrix|Rotation|Orientation)\s*=", header,
                                                   re.MULTILINE) else "the identity matrix (no TransformMatrix)"
        raise InputError(f"{path}: the MetaImage header contradicts itself: AnatomicalOrientation = {stated}, but "
                         f"{matrix} places the voxels as {placed}; our reader (ITK) follows the matrix and ignores "
                         "AnatomicalOrientation, so the masks could come out mirrored; make the two agree")


def _text_head(path: Path) -> str:
    """The first 64 KiB of a text header (NRRD, MetaImage), as latin-1: any header field lies there."""
    with open(path, "rb") as f:
        return f.read(65536).decode("latin-1")


def _nrrd_header_field(path: Path, name: str) -> str | None:
    """The value of field `name` in the NRRD header of `path` (a text header that ends at the first blank
    line), or None. ITK reports no `space dimension`, so the header is looked at for it."""
    header = re.split(r"\r?\n\r?\n", _text_head(path), maxsplit=1)[0]
    found = re.search(rf"^{re.escape(name)}\s*:\s*(.*?)\s*$", header, re.MULTILINE)
    return found.group(1) if found else None


def _detached_data_file(path: Path) -> Path | None:
    """The data file a .mhd / .nhdr header names (ElementDataFile / data file), if it names a single one."""
    if not path.name.lower().endswith((".mhd", ".nhdr")):
        return None
    text = _text_head(path)
    found = re.search(r"^\s*(?:ElementDataFile\s*=|data ?file\s*:)\s*(\S.*?)\s*$", text, re.MULTILINE | re.IGNORECASE)
    if not found or found.group(1).upper() in ("LOCAL", "LIST") or "%" in found.group(1):
        return None
    return path.with_name(found.group(1)) if not Path(found.group(1)).is_absolute() else Path(found.group(1))


# --- declared size against the file -----------------------------------------------------------------------


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _check_size(name: Path, data_file: Path, shape: list[int], type_name: str, declared: int, offset: int = 0,
                compressed_only: bool = False) -> None:
    """InputError when `data_file` cannot hold `declared` bytes of voxels after `offset` header bytes."""
    stored = data_file.stat().st_size
    what = f"{'x'.join(map(str, shape))} voxels of {type_name} ({_human(declared)})"
    if _is_gzip(data_file) or compressed_only:
        if declared > MAX_DEFLATE_RATIO * stored:
            raise InputError(f"{name}: the header declares {what} but the file holds only {_human(stored)}, "
                             "more than any compression can hold; the header is corrupt or the file is cut short")
        if compressed_only or not _is_gzip(data_file):
            return
        available = _gzip_bytes_at_least(data_file, offset + declared) - offset
    else:
        available = stored - offset
    if available < declared and available * 100 < declared:  # nearly nothing there: rather a corrupt header
        raise InputError(f"{name}: the header declares {what} but the file holds only {_human(stored)}; the header "
                         "is corrupt or the file is cut short")
    if available < declared:
        missing = 100 * (declared - max(available, 0)) / declared
        raise InputError(f"{name} is truncated: the header declares {what} but only {_human(max(available, 0))} "
                         f"of voxel data are there (about {missing:.0f}% missing); copy or download the file again")


def _gzip_bytes_at_least(path: Path, needed: int) -> int:
    """The uncompressed size of gzip file `path`, counted up to `needed` bytes (enough to know it suffices)."""
    with open(path, "rb") as f:
        f.seek(-4, 2)
        if int.from_bytes(f.read(4), "little") == needed % 2**32:
            # The trailer's size matches: a cut file would need its last 4 compressed bytes to equal it by
            # chance (2^-32), so the whole stream is there and we skip decompressing it.
            return needed
    total, stream, pending = 0, zlib.decompressobj(zlib.MAX_WBITS | 16), b""
    try:
        with open(path, "rb") as f:
            while total < needed:
                if stream.eof:  # a gzip member ended; another one may follow
                    pending = stream.unused_data or f.read(_CHUNK)
                    if not pending.startswith(b"\x1f\x8b"):
                        break  # end of file, or padding after the last member
                    stream = zlib.decompressobj(zlib.MAX_WBITS | 16)
                if not pending:
                    pending = f.read(_CHUNK)
                    if not pending:
                        break  # the file ends inside the stream: truncated
                total += len(stream.decompress(pending, _CHUNK))  # bounded output: the data is never kept
                pending = stream.unconsumed_tail
    except zlib.error as e:
        raise InputError(f"{path}: the gzip data is damaged ({e}); copy or download the file again") from None
    return total
