"""Damaged, absurd and thin inputs, unwritable outputs and misspelt classes: each refused in one line
(exit 2 in the CLI) before the model runs, or segmented with a warning.

The corpus is generated here (from the bundled sample CT where a real scan matters) plus files written
by other tools: nibabel's own test data, SimpleITK-written MHA/NRRD, nibabel-written NIfTI.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import REPO, SAMPLE_DIR

from UniversalSegLib.cli import main
from UniversalSegLib.errors import ClassNotInModelError, InputError, UnknownClassError
from UniversalSegLib.io import destination as destination_module
from UniversalSegLib.io import read_image, write_outputs
from UniversalSegLib.io.destination import STAGING_PREFIX
from UniversalSegLib.io.image import ThinScanWarning
from UniversalSegLib.io.itk_log import ITKWarning

SAMPLE = SAMPLE_DIR / "ct_abdomen.nii.gz"
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
LIVER_SLAB = slice(88, 91)  # z slices of the sample through liver, spleen and kidneys


def _ct_like(shape=(20, 24, 24), dtype=np.int16) -> np.ndarray:
    """(z, y, x) values spread over air to bone, so the CT-likeness check passes."""
    return np.random.default_rng(0).integers(-1000, 400, size=shape).astype(dtype)


def _cut(path: Path, keep: float = 0.6) -> Path:
    """Drop the last (1 - keep) of a file, as after an interrupted copy."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _nifti(tmp: Path, name: str, array: np.ndarray, zooms=(1.5, 1.5, 1.5)) -> Path:
    """An (x, y, z) array written by nibabel with the given voxel size."""
    image = nib.Nifti1Image(array, np.diag([*zooms, 1.0]), dtype=array.dtype)
    image.header.set_zooms(zooms)
    nib.save(image, tmp / name)
    return tmp / name


def _with_extensions(tmp: Path) -> Path:
    """The sample CT with NIfTI header extensions after the header (comments, as AFNI and others write)."""
    image = nib.load(SAMPLE_DIR / "ct_abdomen.nii.gz")
    for text in (b"written by another tool", b"x" * 4000):  # one reaches past the first 540 bytes
        image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", text))
    nib.save(image, tmp / "with_extensions.nii.gz")
    return tmp / "with_extensions.nii.gz"


def _sample_as(tmp: Path, name: str, compress: bool = False) -> Path:
    sitk.WriteImage(sitk.ReadImage(str(SAMPLE)), str(tmp / name), useCompression=compress)
    return tmp / name


def _nifti_with_pixdim(tmp: Path, value: float) -> Path:
    """A CT-like NIfTI (no qform/sform: spacing from pixdim alone) whose z voxel size is `value`.

    Written from nibabel's header bytes: nibabel's own writer "fixes" a zero pixdim to 1 first."""
    return _declaring(tmp, "bad_pixdim.nii.gz", (24, 24, 20), pixdim=(1.5, 1.5, value),
                      payload=_ct_like().tobytes())


def _declaring(tmp: Path, name: str, shape: tuple[int, ...], code: int = 4, payload: int | bytes = 4096,
               pixdim=(1.0, 1.0, 1.0), dim3: int | None = None) -> Path:
    """A NIfTI header declaring `shape` voxels of NIfTI type `code`, followed by `payload` (bytes, or a count
    of zero bytes) of data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header["datatype"] = code
    known = code in nib.nifti1.data_type_codes.code
    header["bitpix"] = 1 if code == 1 else nib.nifti1.data_type_codes.dtype[code].itemsize * 8 if known else 16
    if dim3 is not None:
        header["dim"][3] = dim3  # set_data_shape refuses what a corrupt header may hold
    header["pixdim"][1:4] = pixdim
    header["vox_offset"] = 352
    data = header.binaryblock + b"\0" * 4 + (bytes(payload) if isinstance(payload, int) else payload)
    (tmp / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return tmp / name


def _nifti_forms(tmp: Path, name: str, qform: np.ndarray | None, sform: np.ndarray | None) -> Path:
    """A CT-like NIfTI with only the given orientation records (None: that record's code is 0)."""
    image = nib.Nifti1Image(_ct_like().T, None)
    image.set_qform(qform, code=0 if qform is None else 1)
    image.set_sform(sform, code=0 if sform is None else 2)
    nib.save(image, tmp / name)
    return tmp / name


RAS_1MM = np.diag([1.0, 1.0, 1.0, 1.0])
LAS_1MM = np.diag([-1.0, 1.0, 1.0, 1.0])  # RAS_1MM mirrored left-right


def _metaimage(tmp: Path, name: str, fields: str, payload: bytes) -> Path:
    header = f"ObjectType = Image\nNDims = 3\n{fields}ElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    (tmp / name).write_bytes(header.encode() + payload)
    return tmp / name


def _itk_oriented_mha(tmp: Path) -> Path:
    """Two MetaImages written by ITK itself (its AnatomicalOrientation agrees with its matrix); returns the
    rotated one after checking that the flipped one reads too."""
    image = sitk.GetImageFromArray(_ct_like())
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    flipped = _sitk_file(tmp, "lpi.mha", image)
    assert read_image(flipped).GetDirection() == image.GetDirection()
    a = np.radians(50)
    image.SetDirection((np.cos(a), -np.sin(a), 0, np.sin(a), np.cos(a), 0, 0, 0, 1))
    return _sitk_file(tmp, "ali.mha", image)


def _nrrd(tmp: Path, name: str, sizes: str, directions: str, payload: bytes) -> Path:
    header = (f"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: {sizes}\n"
              f"space directions: {directions}\nendian: little\nencoding: raw\nspace origin: (0,0,0)\n\n")
    (tmp / name).write_bytes(header.encode() + payload)
    return tmp / name


def _nrrd_without_space(tmp: Path) -> Path:
    header = "NRRD0004\ntype: short\ndimension: 3\nsizes: 24 24 20\nspacings: 1 1 1\nendian: little\nencoding: raw\n\n"
    (tmp / "nospace.nrrd").write_bytes(header.encode() + _ct_like().tobytes())
    return tmp / "nospace.nrrd"


# NRRD spaces and how to write the sample's LPS geometry in each: sign of the x and y world axes
_PATIENT_SPACES = {"left-posterior-superior": (1, 1), "LPS": (1, 1), "right-anterior-superior": (-1, -1),
                   "RAS": (-1, -1), "left-anterior-superior": (1, -1), "LAS": (1, -1)}


def _pynrrd_slab(tmp: Path, name: str, space: str | None) -> Path:
    """A slab of the sample CT written by pynrrd (the NRRD library of Slicer's Python tools) in NRRD space
    `space`: a patient space gets the sample's geometry converted to it; any other space (scanner-xyz,
    3D-right-handed, ...) or None (`space dimension: 3` only) gets the LPS numbers under that name, as an
    exporter that does not know the patient frame writes them."""
    import nrrd

    image = sitk.ReadImage(str(SAMPLE))[:, :, 80:100]
    signs = np.array([*_PATIENT_SPACES.get(space, (1, 1)), 1.0])
    directions = np.array(image.GetDirection()).reshape(3, 3).T * np.array(image.GetSpacing())[:, None]
    header = {"space directions": directions * signs, "space origin": np.array(image.GetOrigin()) * signs,
              "encoding": "gzip"}
    header.update({"space": space} if space else {"space dimension": 3})
    nrrd.write(str(tmp / name), sitk.GetArrayFromImage(image).transpose(2, 1, 0), header)  # pynrrd: x, y, z
    return tmp / name


def _sitk_file(tmp: Path, name: str, image: sitk.Image, compress: bool = False) -> Path:
    sitk.WriteImage(image, str(tmp / name), useCompression=compress)
    return tmp / name


def _complex_mha(tmp: Path) -> Path:
    real = sitk.GetImageFromArray(_ct_like().astype(np.float32))
    return _sitk_file(tmp, "complex.mha", sitk.RealAndImaginaryToComplex(real, real))


def _analyze_without_img(tmp: Path) -> Path:
    shutil.copy(NIBABEL_DATA / "analyze.hdr", tmp / "analyze.hdr")
    return tmp / "analyze.hdr"


def _folder_of_text(tmp: Path) -> Path:
    (tmp / "notes").mkdir()
    for name in ("readme.txt", "report.pdf", "IM0001"):
        (tmp / "notes" / name).write_text("not an image\n" * 50)
    return tmp / "notes"


def _dicom_slab(tmp: Path, slices: slice) -> Path:
    from support import write_dicom_series

    write_dicom_series(sitk.ReadImage(str(SAMPLE))[:, :, slices], tmp / "series")
    return tmp / "series"


def _multi_member_gzip(tmp: Path) -> Path:
    """The sample as two concatenated gzip members (as pigz/bgzip-style tools write): valid, so accepted."""
    raw = gzip.decompress(SAMPLE.read_bytes())
    half = len(raw) // 2
    (tmp / "members.nii.gz").write_bytes(gzip.compress(raw[:half], 1) + gzip.compress(raw[half:], 1))
    return tmp / "members.nii.gz"


def _nibabel_file(name: str):
    return lambda tmp: shutil.copy(NIBABEL_DATA / name, tmp / name) and tmp / name


# case -> (make the file in tmp_path, regex of the InputError, or None when it must be read)
CASES = {
    # truncated data: ITK reads the missing part of a NIfTI as zeros
    "truncated .nii.gz (last 40% missing)": (lambda t: _cut(_sample_as(t, "ct.nii.gz", compress=True)),
                                             r"is truncated: the header declares 122x101x112 voxels of int32 .*"
                                             r"\(about 4\d% missing\)"),
    "truncated .nii (last 40% missing)": (lambda t: _cut(_sample_as(t, "ct.nii")),
                                          r"is truncated: .*about 40% missing"),
    "truncated .mha (SimpleITK)": (lambda t: _cut(_sample_as(t, "ct.mha")), "is truncated"),
    "truncated compressed .mha (SimpleITK)": (lambda t: _cut(_sample_as(t, "ct.mha", compress=True)), "is truncated"),
    "truncated compressed .nrrd (SimpleITK)": (lambda t: _cut(_sample_as(t, "ct.nrrd", compress=True)),
                                               "is truncated"),
    "empty folder (ITK's GDCM warns)": (lambda t: (t / "empty").mkdir() or t / "empty", "without a DICOM series"),
    "folder of non-DICOM files": (lambda t: _folder_of_text(t), "without a DICOM series"),
    "empty file": (lambda t: (t / "empty.nii.gz").write_bytes(b"") or t / "empty.nii.gz", r"is empty \(0 bytes\)"),
    # geometry: zero or non-finite spacing (NIfTI pixdim 0 is silently 1 mm in ITK)
    "NIfTI pixdim 0": (lambda t: _nifti_with_pixdim(t, 0.0), r"pixdim\) is zero along z .*silently read 1 mm"),
    "NIfTI pixdim NaN": (lambda t: _nifti_with_pixdim(t, float("nan")), r"pixdim\) is not a number along z"),
    "NIfTI pixdim inf": (lambda t: _nifti_with_pixdim(t, float("inf")), r"pixdim\) is not a number along z"),
    "MHA spacing 0": (lambda t: _metaimage(t, "zero.mha", "DimSize = 24 24 20\nElementSpacing = 1 1 0\n",
                                           _ct_like().tobytes()), "spacing is zero along z"),
    "NRRD spacing NaN": (lambda t: _nrrd(t, "nan.nrrd", "24 24 20", "(nan,0,0) (0,1,0) (0,0,1)",
                                         _ct_like().tobytes()), "cannot read"),
    # orientation: none at all, or two that disagree (ITK took the qform, nibabel and most tools the sform)
    "NIfTI without qform or sform": (lambda t: _nifti_forms(t, "noform.nii.gz", None, None),
                                     r"has no orientation \(qform_code and sform_code are 0\)"),
    "NIfTI whose qform and sform disagree": (lambda t: _nifti_forms(t, "mirrored.nii.gz", LAS_1MM, RAS_1MM),
                                             r"two orientations \(qform and sform\) disagree, placing the image "
                                             r"up to \d+ mm apart"),
    "10 mm voxels, 110x110 of them (1.1 m across)": (lambda t: _nifti(t, "wide.nii.gz", _ct_like((20, 110, 110)).T,
                                                                       zooms=(10.0, 10.0, 10.0)),
                                                     r"is 1100 x 1100 mm along two axes, wider than any CT's field"),
    "0.9 mm voxels, 1000 slices (a 0.9 m long scan)": (lambda t: _nifti(t, "long.nii.gz", _ct_like((1000, 24, 24)).T,
                                                                        zooms=(0.9, 0.9, 0.9)), None),
    "NIfTI with header extensions (read; they broke the header check)": (_with_extensions, None),
    # segmentations written by other tools, picked instead of the CT beside them
    "TotalSegmentator label map given as the image": (
        lambda t: Path(shutil.copy(REPO / "Testing/data/shared/ct-abdomen/labels_totalsegmentator_v2.nii.gz", t)),
        r"looks like a segmentation, not a scan \(\d+ distinct whole values from 0 to \d+"),
    "a binary mask given as the image": (
        lambda t: Path(shutil.copy(REPO / "Testing/data/shared/ct-thorax-aorta/masks/aorta.nii.gz", t)),
        r"looks like a segmentation, not a scan \(2 distinct whole values from 0 to 1"),
    "blank scan (every voxel -1024)": (lambda t: _nifti(t, "air.nii.gz", np.full((24, 24, 20), -1024, np.int16)),
                                       r"every voxel has the same value \(-1024\); the image is blank"),
    "NRRD without orientation (spacings only)": (lambda t: _nrrd_without_space(t), "NRRD header has no orientation"),
    # NRRD spaces that name no patient axes: ITK took their axes as LPS, so the masks could be mirrored
    "NRRD space scanner-xyz (pynrrd)": (lambda t: _pynrrd_slab(t, "scanner.nrrd", "scanner-xyz"),
                                        r"NRRD header's space is 'scanner-xyz', which does not say where the "
                                        r"patient's left, back and head are .*set `space: left-posterior-superior`"),
    "NRRD space 3D-right-handed (pynrrd)": (lambda t: _pynrrd_slab(t, "rh.nrrd", "3D-right-handed"),
                                            r"space is '3D-right-handed', which does not say"),
    "NRRD space 3D-left-handed (pynrrd)": (lambda t: _pynrrd_slab(t, "lh.nrrd", "3D-left-handed"),
                                           r"space is '3D-left-handed', which does not say"),
    "NRRD space directions without a space (pynrrd)": (lambda t: _pynrrd_slab(t, "nospace.nrrd", None),
                                                       r"has 'space directions' but no 'space' \(only 'space "
                                                       r"dimension'\).*`space: left-posterior-superior`"),
    "NRRD in RAS (pynrrd)": (lambda t: _pynrrd_slab(t, "ras.nrrd", "right-anterior-superior"), None),
    "sheared NRRD (a tilted gantry)": (lambda t: _nrrd(t, "sheared.nrrd", "24 24 20", "(1,0,0) (0,1,0) (0,0.5,1)",
                                                       _ct_like().tobytes()),
                                       r"voxel axes are not perpendicular \(angles 90.0, 90.0, 63.4 degrees"),
    "sheared MHA": (lambda t: _metaimage(t, "sheared.mha", "DimSize = 24 24 20\nElementSpacing = 1 1 1\n"
                                         "TransformMatrix = 1 0 0 0 1 0 0 0.5 1\n", _ct_like().tobytes()),
                    "voxel axes are not perpendicular"),
    # ITK places MetaImage voxels by TransformMatrix and ignores AnatomicalOrientation: a header whose two
    # fields disagree would be read mirrored without a word
    "MHA whose AnatomicalOrientation contradicts its TransformMatrix": (
        lambda t: _metaimage(t, "contra.mha", "DimSize = 24 24 20\nElementSpacing = 1 1 1\n"
                             "TransformMatrix = 1 0 0 0 1 0 0 0 1\nAnatomicalOrientation = LPI\n",
                             _ct_like().tobytes()),
        r"contradicts itself: AnatomicalOrientation = LPI, but its TransformMatrix places the voxels as RAI"),
    "MHA with AnatomicalOrientation and no TransformMatrix": (
        lambda t: _metaimage(t, "nomatrix.mha", "DimSize = 24 24 20\nElementSpacing = 1 1 1\n"
                             "AnatomicalOrientation = RPS\n", _ct_like().tobytes()),
        r"AnatomicalOrientation = RPS, but the identity matrix \(no TransformMatrix\) places the voxels as RAI"),
    "MHA written by ITK, flipped (LPI) and rotated 50 degrees (ALI)": (_itk_oriented_mha, None),
    "MHA with AnatomicalOrientation ??? (oblique, as some writers put it)": (
        lambda t: _metaimage(t, "unknown.mha", "DimSize = 24 24 20\nElementSpacing = 1 1 1\n"
                             "AnatomicalOrientation = ???\n", _ct_like().tobytes()), None),
    "NIfTI with a sform only": (lambda t: _nifti_forms(t, "sform.nii.gz", None, RAS_1MM), None),
    "NIfTI with a qform only": (lambda t: _nifti_forms(t, "qform.nii.gz", RAS_1MM, None), None),
    "NIfTI with agreeing qform and sform": (lambda t: _nifti_forms(t, "both.nii.gz", RAS_1MM, RAS_1MM), None),
    # headers declaring far more than the file holds: refused before anything is allocated
    "NIfTI 32767^3 voxels, 4 KB of data (.nii)": (lambda t: _declaring(t, "huge.nii", (32767,) * 3),
                                                  r"declares 32767x32767x32767 voxels of int16 \(64\.0 TiB\)"),
    "NIfTI 32767^3 voxels, 4 KB of data (.nii.gz)": (lambda t: _declaring(t, "huge.nii.gz", (32767,) * 3),
                                                     "more than any compression can hold"),
    "NIfTI 1024^3 voxels, 4 KB of data (.nii)": (lambda t: _declaring(t, "big.nii", (1024,) * 3),
                                                 r"declares 1024x1024x1024 voxels of int16 \(2\.0 GiB\) but the file "
                                                 r"holds only 4\.3 KiB; the header is corrupt"),
    "NIfTI 1024^3 voxels, 4 KB of data (.nii.gz)": (lambda t: _declaring(t, "big.nii.gz", (1024,) * 3),
                                                    r"declares 1024x1024x1024 voxels of int16 \(2\.0 GiB\)"),
    "MHA 32767^3 voxels, 4 KB of data": (lambda t: _metaimage(t, "huge.mha", "DimSize = 32767 32767 32767\n"
                                                              "ElementSpacing = 1 1 1\n", bytes(4096)),
                                         "more than any compression can hold"),
    "NRRD 1024^3 voxels, 4 KB of data": (lambda t: _nrrd(t, "big.nrrd", "1024 1024 1024", "(1,0,0) (0,1,0) (0,0,1)",
                                                         bytes(4096)), "more than any compression can hold"),
    "NIfTI with a negative size": (lambda t: _declaring(t, "negative.nii", (24, 24, 20), dim3=-20),
                                   r"declares a negative size \(24x24x-20\)"),
    "NIfTI with an undefined datatype": (lambda t: _declaring(t, "undefined.nii", (24, 24, 20), code=9999),
                                         r"voxel type \(datatype 9999\) is not one NIfTI defines"),
    # voxel types a CT cannot have
    "complex64 NIfTI": (lambda t: _nifti(t, "complex.nii.gz", _ct_like().T.astype(np.complex64)),
                        r"complex voxels \(complex64\)"),
    "complex64 MHA (SimpleITK)": (_complex_mha, r"has 2 values per voxel"),  # MetaImage stores complex as 2
    "1-bit NIfTI": (lambda t: _declaring(t, "bits.nii", (24, 24, 20), code=1, payload=24 * 24 * 20 // 8),
                    "1-bit voxels"),
    "RGB NIfTI": (lambda t: _declaring(t, "rgb.nii", (24, 24, 20), code=128, payload=24 * 24 * 20 * 3),
                  r"colour voxels \(RGB\)"),
    "float128 NIfTI": (lambda t: _declaring(t, "f128.nii", (24, 24, 20), code=1536, payload=24 * 24 * 20 * 16),
                       "voxels of type float128, which we cannot read"),
    # thin scans: down to 3 slices segmented (with a warning), fewer refused
    "3-slice CT": (lambda t: _sitk_file(t, "thin3.nii.gz", sitk.ReadImage(str(SAMPLE))[:, :, LIVER_SLAB]), None),
    "3-slice DICOM series": (lambda t: _dicom_slab(t, LIVER_SLAB), None),
    "2-slice DICOM series": (lambda t: _dicom_slab(t, slice(88, 90)), r"has 2 voxels along z \(too few to segment\)"),
    "2-slice CT": (lambda t: _sitk_file(t, "thin2.nii.gz", sitk.ReadImage(str(SAMPLE))[:, :, 88:90]),
                   r"has 2 voxels along z \(too few to segment\); a 3D CT needs at least 3 slices"),
    "1-slice CT": (lambda t: _sitk_file(t, "thin1.nii.gz", sitk.ReadImage(str(SAMPLE))[:, :, 88:89]),
                   "a single slice is not a 3D scan"),
    # well-formed files that take the slower or rarer paths
    "bundled sample": (lambda t: SAMPLE, None),
    "two gzip members (.nii.gz)": (_multi_member_gzip, None),
    "int64 NIfTI (nibabel)": (lambda t: _nifti(t, "i64.nii.gz", _ct_like(dtype=np.int64).T), None),
    "NIfTI-2 (nibabel)": (lambda t: nib.save(nib.Nifti2Image(_ct_like().T, np.eye(4)), t / "n2.nii") or t / "n2.nii",
                          "is a NIfTI-2 file, which our reader"),
    # nibabel's own test files
    "nibabel analyze.hdr (no .img)": (_analyze_without_img, r"image file analyze\.img is missing"),
    "nibabel example4d.nii.gz": (_nibabel_file("example4d.nii.gz"), "is 4D"),
    "nibabel example_nifti2.nii.gz": (_nibabel_file("example_nifti2.nii.gz"), "NIfTI-2"),
    "nibabel standard.nii.gz (4x5x7)": (_nibabel_file("standard.nii.gz"), "has 5 voxels along y"),
    "nibabel tiny.mnc (MINC1)": (_nibabel_file("tiny.mnc"), "cannot read"),
    "nibabel test.mgz": (_nibabel_file("test.mgz"), "unsupported format"),
    "nibabel resampled_anat_moved.nii (NaN)": (_nibabel_file("resampled_anat_moved.nii"), "153 voxels are NaN"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_input_is_refused_in_one_line_or_read(case, tmp_path, capfd):
    make, expected = CASES[case]
    path = make(tmp_path)
    capfd.readouterr()  # what writing the file printed (SimpleITK's MetaImage writer warns) is not ours
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if expected is None:
            image = read_image(path)
            assert image.GetDimension() == 3
        else:
            with pytest.raises(InputError, match=expected) as info:
                read_image(path)
            assert "\n" not in str(info.value)
    out, err = capfd.readouterr()
    assert out == "" and err == "", f"raw library output reached the terminal: {out!r} {err!r}"
    assert not [w for w in caught if issubclass(w.category, ITKWarning)], [str(w.message) for w in caught]
    thin = [w for w in caught if issubclass(w.category, ThinScanWarning)]
    assert bool(thin) == case.startswith("3-slice"), [str(w.message) for w in thin]


@pytest.mark.parametrize("name,shape", [("huge.nii", (32767,) * 3), ("huge.nii.gz", (32767,) * 3),
                                        ("big.nii.gz", (1024,) * 3), ("big.nii", (1024,) * 3)])
def test_absurd_headers_are_refused_before_itk_allocates(name, shape, tmp_path, monkeypatch):
    def allocate(self):
        raise AssertionError("ITK's reader ran: it would have allocated the declared size")

    monkeypatch.setattr(sitk.ImageFileReader, "Execute", allocate)
    with pytest.raises(InputError, match="declares"):
        read_image(_declaring(tmp_path, name, shape))


def test_trailer_shortcut_and_full_count_agree_on_the_sample(tmp_path):
    """The gzip trailer (size mod 2^32) decides for a whole file; a cut file is counted byte by byte."""
    from UniversalSegLib.io import header_checks

    raw_size = len(gzip.decompress(SAMPLE.read_bytes()))
    assert header_checks._gzip_bytes_at_least(SAMPLE, raw_size) == raw_size
    cut = _cut(_sample_as(tmp_path, "ct.nii.gz", compress=True), 0.5)
    counted = header_checks._gzip_bytes_at_least(cut, raw_size)
    assert 0 < counted < raw_size
    with gzip.open(cut) as f:  # what the stream holds up to where it breaks off
        with pytest.raises(EOFError):
            f.read()


def test_itk_warnings_become_python_warnings_not_terminal_lines(tmp_path, capfd):
    """ITK prints 'Analyze file ... deprecated' from C++ when reading an Analyze pair: it must not reach fd 2."""
    nib.save(nib.AnalyzeImage(_ct_like().T, np.diag([1.5, 1.5, 1.5, 1])), tmp_path / "ct.hdr")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(tmp_path / "ct.hdr")
    assert image.GetSize() == (24, 24, 20)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    itk = [str(w.message) for w in caught if issubclass(w.category, ITKWarning)]
    assert itk and all("\n" not in m and "0x" not in m for m in itk) and any("Analyze" in m for m in itk), itk


def test_itk_output_capture_keeps_python_warnings_and_restores_the_terminal(capfd):
    from UniversalSegLib.io.itk_log import capture_itk_output

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with capture_itk_output() as log:
            os.write(2, b"WARNING: In /x/itkFoo.cxx, line 3\nFoo (0x1234): first\n\nBar (0xabc): second\n")
            warnings.warn("ours", UserWarning, stacklevel=1)
    assert log.messages == ["first", "second"]
    assert [str(w.message) for w in caught] == ["ours", "ITK: first", "ITK: second"]
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"


@pytest.mark.parametrize("space", [s for s in _PATIENT_SPACES if s != "left-posterior-superior"])
def test_nrrd_in_any_patient_space_reads_as_the_same_placed_image(space, tmp_path):
    """ITK converts RAS and LAS NRRDs to LPS: the same slab written in each space is the same image in the
    world (voxels, origin, axes), so its masks land on the same anatomy."""
    lps = read_image(_pynrrd_slab(tmp_path, "lps.nrrd", "left-posterior-superior"))
    other = read_image(_pynrrd_slab(tmp_path, "other.nrrd", space))
    original = sitk.ReadImage(str(SAMPLE))[:, :, 80:100]
    for image in (lps, other):
        assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(original))
        assert np.allclose(image.GetOrigin(), original.GetOrigin(), atol=1e-4)
        assert np.allclose(image.GetDirection(), original.GetDirection(), atol=1e-6)
        assert np.allclose(image.GetSpacing(), original.GetSpacing(), atol=1e-6)


def test_cli_refuses_a_scanner_frame_nrrd_with_exit_2(tmp_path):
    path = _pynrrd_slab(tmp_path, "scanner.nrrd", "scanner-xyz")
    run = subprocess.run([sys.executable, "-m", "UniversalSegLib", "predict", str(path), "-o", str(tmp_path / "out"),
                          "--classes", "liver"], capture_output=True, text=True, encoding="utf-8", timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 2 and run.stdout == "", run.stdout
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("universalseg: error: ") \
        and "space is 'scanner-xyz'" in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()


# --- the CLI: one line, exit 2, before the model runs --------------------------------------------------------


@pytest.fixture
def no_model_run(monkeypatch):
    """Fail the test if the model would run."""
    from UniversalSegLib.inference import predict as predict_module

    def run(*args, **kwargs):
        raise AssertionError("the model ran although the input or output should have been refused")

    monkeypatch.setattr(predict_module, "predict", run)


@pytest.mark.parametrize("case", ["truncated .nii.gz (last 40% missing)", "NIfTI pixdim 0", "1-bit NIfTI",
                                  "complex64 NIfTI", "NIfTI 32767^3 voxels, 4 KB of data (.nii)"])
def test_cli_refuses_damaged_input_in_one_line(case, tmp_path, capfd, no_model_run):
    path = CASES[case][0](tmp_path)
    code = main(["predict", str(path), "-o", str(tmp_path / "out"), "--classes", "liver"])
    out, err = capfd.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("universalseg: error: "), err
    assert not (tmp_path / "out").exists()


def _sample_slab(tmp_path: Path) -> Path:
    return _sitk_file(tmp_path, "slab.nii.gz", sitk.ReadImage(str(SAMPLE))[:, :, 80:100])


@pytest.mark.parametrize("where", ["file as folder", "file as parent"])
def test_output_where_a_file_is_refused_before_the_model(where, tmp_path, capfd, no_model_run):
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    out = blocker if where == "file as folder" else blocker / "out"
    code = main(["predict", str(_sample_slab(tmp_path)), "-o", str(out), "--classes", "liver"])
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a folder" in err, err
    assert blocker.read_text() == "a file"


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write into: permission bits for a normal user, a read-only tmpfs for root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.name == "posix" and os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                                 capture_output=True)
        if mounted.returncode != 0:
            pytest.skip("root without mount permission: cannot make a read-only folder")
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_read_only_output_is_refused_before_the_model(read_only_dir, tmp_path, capfd, no_model_run):
    code = main(["predict", str(_sample_slab(tmp_path)), "-o", str(read_only_dir / "out"), "--classes", "liver"])
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "cannot write to output" in err and ("Read-only" in err or "Permission denied" in err), err


def test_too_little_free_space_is_refused_before_the_model(tmp_path, capfd, monkeypatch, no_model_run):
    monkeypatch.setattr(destination_module.shutil, "disk_usage", lambda p: SimpleNamespace(free=1000))
    code = main(["predict", str(_sample_slab(tmp_path)), "-o", str(tmp_path / "out"), "--classes", "liver"])
    err = capfd.readouterr().err
    assert code == 2 and "not enough disk space" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


# --- writing: a full disk leaves nothing; a killed run's staging folder is cleaned up -----------------------


@pytest.fixture(scope="module")
def result():
    """A small real result: the sample's liver and spleen labels (from its TotalSegmentator reference)."""
    from UniversalSegLib.inference.result import ClassResult, SegmentationResult
    from UniversalSegLib.registry import default_registry

    ct = read_image(SAMPLE)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_DIR / "ct_abdomen_labels_totalsegmentator_v2.nii.gz")))
    registry = default_registry()
    return SegmentationResult(ct, [ClassResult(registry["spleen"], labels == 1, 0.9),
                                   ClassResult(registry["liver"], labels == 5, 0.9)], "test")


def test_disk_full_while_writing_leaves_nothing(result, tmp_path, monkeypatch):
    from UniversalSegLib.io import writers

    def full(*args, **kwargs):  # the last writer: seg.nrrd and the masks are already staged
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writers, "write_statistics", full)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match=r"No space left on device; nothing was written") as info:
        write_outputs(result, out, ["seg.nrrd", "nifti", "stats"])
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 24 KiB tmpfs (root only): a real full disk (the outputs below take about 50 KiB)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    if not (os.name == "posix" and os.geteuid() == 0):
        pytest.skip("mounting a tiny tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_really_full_disk_leaves_nothing(result, tiny_disk):
    (tiny_disk / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="No space left on device; nothing was written"):
        write_outputs(result, tiny_disk, ["nifti", "labelmap", "seg.nrrd", "stats"])
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["keep.txt"]


def test_staging_folder_of_a_killed_run_is_removed_by_the_next(result, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          encoding="utf-8")
    out = tmp_path / "out"
    stale = out / f"{STAGING_PREFIX}{int(dead.stdout)}-0123abcd"
    running = out / f"{STAGING_PREFIX}{os.getppid()}-4567cdef"  # our parent runs: its staging is kept
    for folder in (stale, running):
        folder.mkdir(parents=True)
        (folder / "statistics.csv").write_text("half")
    old_masks = out / ".old-89abcdef-masks"  # io/atomic.py's sibling of a folder being replaced
    (old_masks / "liver.nii.gz").parent.mkdir()
    (old_masks / "liver.nii.gz").write_bytes(b"old")
    users = out / ".tmp-01234567-notes.txt"  # not a name of ours: kept
    users.write_text("mine")
    an_hour_ago = time.time() - 3600
    for path in (old_masks, users):
        os.utime(path, (an_hour_ago, an_hour_ago))
    outputs = write_outputs(result, out, ["stats"])
    assert outputs["stats"].exists()
    assert not stale.exists() and running.exists()
    assert not old_masks.exists() and users.read_text() == "mine"
    assert not [p for p in out.iterdir() if p.name.startswith(STAGING_PREFIX) and p != running]


# --- classes: one string is one class; typos get suggestions; a class elsewhere names its models -------------


def test_a_single_string_is_one_class():
    from UniversalSegLib.inference.predict import needed_classes
    from UniversalSegLib.store import find_model, read_manifest

    manifest = read_manifest(find_model(None))
    wanted, _ = needed_classes(manifest, "liver")
    assert [c.key for c in wanted] == ["liver"]
    from UniversalSegModuleLib import backend  # on pytest's pythonpath
    args = backend.predict_args("in.nrrd", "out", classes="liver")
    assert args[args.index("--classes") + 1:args.index("--device")] == ["liver"]


@pytest.mark.parametrize("typo,meant", [("livr", "liver"), ("gall blader", "gallbladder"), ("splen", "spleen"),
                                        ("kidny left", "kidney_left")])
def test_typos_get_suggestions(typo, meant):
    from UniversalSegLib.inference.predict import needed_classes
    from UniversalSegLib.store import find_model, read_manifest

    with pytest.raises(UnknownClassError, match=rf"unknown class '{typo}' \(did you mean: [^)]*\b{meant}\b"):
        needed_classes(read_manifest(find_model(None)), [typo])


def test_class_missing_from_the_model_names_the_models_that_have_it(minilm, monkeypatch, tmp_path):
    from UniversalSegLib.inference.predict import needed_classes
    from UniversalSegLib.store import create_model, find_model, read_manifest, save_model

    bundled = read_manifest(find_model(None))
    with pytest.raises(ClassNotInModelError, match=rf"'liver tumor' \(liver_tumor\) is not in model {bundled.name} "
                                                   r"\(models that have it: none installed"):
        needed_classes(bundled, ["liver tumor"])
    torch.manual_seed(0)
    model, manifest = create_model("tumour-model", ["liver", "liver_tumor"], backbone_config={
        "init_filters": 16, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}, text_encoder=minilm)
    save_model(model, manifest, Path(os.environ["UNIVERSALSEG_MODELS"]) / "tumour-model")
    with pytest.raises(ClassNotInModelError, match=r"\(models that have it: tumour-model\)"):
        needed_classes(bundled, ["liver tumor"])


def test_cli_class_typo_is_one_line_before_the_model(tmp_path, capfd, no_model_run):
    code = main(["predict", str(SAMPLE), "-o", str(tmp_path / "out"), "--classes", "livr"])
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "did you mean: liver" in err, err


@pytest.mark.parametrize("command", ["predict", "cohort"])
@pytest.mark.parametrize("empty", ["input", "output"])
def test_cli_empty_paths_are_refused_not_read_as_the_current_folder(command, empty, tmp_path, capfd, monkeypatch,
                                                                   no_model_run):
    # an unset shell variable (`-o "$OUT"`): Path("") is ".", so the outputs went into the current folder
    monkeypatch.chdir(tmp_path)
    args = [command, "" if empty == "input" else str(SAMPLE), "-o", "" if empty == "output" else "out"]
    code = main(args)
    err = capfd.readouterr().err
    if command == "cohort" and empty == "input":
        assert code == 2 and "universalseg: error:" in err, err  # its discovery refuses "" as a missing input
    else:
        assert code == 2 and err.count("\n") == 1 and "is an empty path" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "something was written"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path):
    import threading

    fifo = tmp_path / "ct.nii.gz"
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            read_image(fifo)
        except InputError as e:
            outcome.append(str(e))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(20)
    if reader.is_alive():  # the old code blocked in open(): give it a writer that closes at once, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(20)
        pytest.fail("reading a named pipe waited for a writer")
    assert len(outcome) == 1 and "is not a regular file (a pipe, device or socket)" in outcome[0], outcome


# --- thin series end to end (bundled model) ----------------------------------------------------------------


def test_cli_segments_a_three_slice_ct_with_one_line_warnings(tmp_path, capfd):
    """The bundled model on 3 slices of the sample: masks come out, warnings name the cut-off structures."""
    thin = CASES["3-slice CT"][0](tmp_path)
    code = main(["predict", str(thin), "-o", str(tmp_path / "out"), "--classes", "liver", "spleen",
                 "--formats", "stats", "--progress-json"])
    out, err = capfd.readouterr()
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.strip()]
    assert warned and all(line.startswith("universalseg: warning: ") for line in warned), warned
    assert any("only 3 slices along z: structures that go on beyond the scan are cut off" in w for w in warned)
    assert any("liver, spleen reach its first or last slice" in w for w in warned), warned
    rows = json.loads((tmp_path / "out" / "statistics.json").read_text())["classes"]
    assert [r["key"] for r in rows] == ["liver", "spleen"]
    assert all(r["voxel_count"] > 300 and r["touches_border"] for r in rows), rows  # liver: 1930 in a full run


def test_piped_cli_keeps_itk_output_off_the_json_channel(tmp_path):
    """MetaIO prints 'data not read completely' to stdout from C++; through a pipe (as Slicer reads it) it
    is buffered by C stdio, and must not come out on the JSON progress channel after our capture ends."""
    path = CASES["truncated .mha (SimpleITK)"][0](tmp_path)
    run = subprocess.run([sys.executable, "-m", "UniversalSegLib", "predict", str(path), "-o", str(tmp_path / "out"),
                          "--progress-json"], capture_output=True, text=True, encoding="utf-8", timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 2 and run.stdout == "", run.stdout
    assert run.stderr.count("\n") == 1 and "is truncated" in run.stderr, run.stderr


_CAPTURE_IN_ANOTHER_THREAD = """
import sys, threading
from UniversalSegLib.io.itk_log import capture_itk_output, python_output_apart
inside, release, captured = threading.Event(), threading.Event(), []

def read():  # as the cohort's reading thread: an ITK read inside a capture
    with capture_itk_output(warn=False) as log:
        inside.set()
        release.wait(30)
    captured.append(log.text)

with python_output_apart():
    reader = threading.Thread(target=read)
    reader.start()
    inside.wait(30)
    print("universalseg: case a refused: ours", file=sys.stderr)
    print('{"progress": 0.5}', flush=True)
    release.set()
    reader.join()
print("captured=" + repr(captured[0]), file=sys.stderr)
"""


def test_a_capture_in_another_thread_leaves_our_own_lines_alone():
    """A cohort reads the next case (ITK output captured: fds 1 and 2 redirected) while the main thread
    prints a refused case's line or a JSON progress line: those went into the capture and came back as an
    'ITK:' warning (seen in a real cohort run), or were lost to the JSON channel."""
    run = subprocess.run([sys.executable, "-c", _CAPTURE_IN_ANOTHER_THREAD], capture_output=True, text=True,
                         encoding="utf-8", timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    assert run.stdout == '{"progress": 0.5}\n'
    assert run.stderr.splitlines() == ["universalseg: case a refused: ours", "captured=''"], run.stderr
