"""DICOM input as hospitals export it, and DICOM SEG output from it.

Every series here is written by the test itself with pydicom, from a 12-slice crop of the real
abdomen CT (ct-abdomen/ct_small.nii.gz), carrying one real-world variation at a time: compressed
transfer syntaxes, an empty dataset SOP Class UID, no Frame of Reference, missing slices, uneven
spacing, a tilted stack, two series, a localiser, non-image objects. pydicom's own CT_small.dcm (a
real scanner slice, MIT licence) checks the decoding of a file we did not write.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import shared
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from UniversalSegLib.cli import main
from UniversalSegLib.errors import InputError
from UniversalSegLib.inference.result import ClassResult, SegmentationResult
from UniversalSegLib.io import dicom_source_files, read_image, write_outputs
from UniversalSegLib.io.dicom_input import DicomSeriesWarning, find_series, read_stack, scan_folder
from UniversalSegLib.io.writers import dicom_seg_refusal
from UniversalSegLib.registry import default_registry

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR (e.g. a dose report)
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LIVER = 5  # TotalSegmentator v2 label id
INTERCEPT = -1024  # stored values are HU + 1024, as most scanners store CT (signed: the crop has air below -1024)


@pytest.fixture(scope="module")
def crop() -> tuple[sitk.Image, np.ndarray]:
    """12 axial slices (122 x 101, 3 mm) of the real abdomen CT in LPS, and its liver mask (z, y, x)."""
    image = sitk.DICOMOrient(sitk.ReadImage(str(shared("ct-abdomen", "ct_small.nii.gz"))), "LPS")[:, :, 10:22]
    labels = sitk.DICOMOrient(sitk.ReadImage(str(shared("ct-abdomen", "ct_small_labels_totalsegmentator_v2.nii.gz"))),
                              "LPS")[:, :, 10:22]
    return image, sitk.GetArrayFromImage(labels) == LIVER


def _file_meta(sop_instance: str, transfer_syntax: str, sop_class: str = CT_IMAGE_STORAGE) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def _common(ds: Dataset, study: str, series: str, modality: str, description: str, number: int) -> None:
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "P1", "19700101", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study, "20260101", "120000", "1"
    ds.ReferringPhysicianName, ds.AccessionNumber = "", ""
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = modality, series, number, description
    ds.Manufacturer = "Test"


def write_series(folder: Path, image: sitk.Image, *, transfer_syntax: str = ExplicitVRLittleEndian,
                 empty_sop_class: bool = False, frame_of_reference: bool = True, drop: tuple[int, ...] = (),
                 positions: list[float] | None = None, shift_per_slice: float = 0.0, series_uid: str | None = None,
                 study_uid: str | None = None, description: str = "Abdomen 3mm", prefix: str = "ct") -> list[Path]:
    """`image` (LPS, axial) as a single-frame CT series, one file per slice; returns the files written.

    drop: slice indices left out (missing slices). positions: z of each slice instead of the image's.
    shift_per_slice: sideways (x) shift of each slice's corner, as a tilted gantry gives.
    """
    folder.mkdir(parents=True, exist_ok=True)
    array = sitk.GetArrayFromImage(image)
    study, series, frame = study_uid or generate_uid(), series_uid or generate_uid(), generate_uid()
    files = []
    for k in range(array.shape[0]):
        if k in drop:
            continue
        ds = Dataset()
        ds.file_meta = _file_meta(generate_uid(), transfer_syntax)
        ds.SOPClassUID = "" if empty_sop_class else CT_IMAGE_STORAGE
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        _common(ds, study, series, "CT", description, 2)
        if frame_of_reference:
            ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        x, y, z = image.TransformIndexToPhysicalPoint((0, 0, k))
        ds.ImagePositionPatient = [x + k * shift_per_slice, y, positions[k] if positions else z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [image.GetSpacing()[1], image.GetSpacing()[0]]
        ds.SliceThickness, ds.KVP, ds.AcquisitionNumber, ds.InstanceNumber = image.GetSpacing()[2], 120, 1, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = INTERCEPT, 1, "HU"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = array.shape[1:]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        stored = (array[k].astype(np.int32) - INTERCEPT).astype(np.int16)
        ds.PixelData = stored.tobytes()
        if transfer_syntax == JPEGLosslessSV1:
            _gdcm_jpeg_lossless(ds, stored, folder / f".{k}.tmp")
        elif transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax, stored)
        path = folder / f"{prefix}_{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _gdcm_jpeg_lossless(ds: Dataset, stored: np.ndarray, scratch: Path) -> None:
    """Compress `ds`'s pixels to JPEG Lossless (process 14), which pydicom cannot encode: through GDCM."""
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.UseCompressionOn()
    writer.SetCompressor("JPEG")
    writer.SetFileName(str(scratch))
    writer.Execute(sitk.GetImageFromArray(stored[None]))
    encoded = pydicom.dcmread(scratch)
    scratch.unlink()
    ds.file_meta.TransferSyntaxUID = encoded.file_meta.TransferSyntaxUID
    ds.PixelData = encoded.PixelData
    for name in ("BitsStored", "HighBit", "PixelRepresentation"):
        setattr(ds, name, getattr(encoded, name))


def write_localiser(folder: Path, like: Path) -> Path:
    """A scout of the series of `like` (same series UID, coronal, ImageType LOCALIZER)."""
    ds = pydicom.dcmread(like)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    path = folder / "scout.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_non_image(folder: Path, sop_class: str, modality: str, name: str) -> Path:
    """A DICOM object without pixels: an SR (dose report) or a SEG header, as PACS exports put beside a CT."""
    ds = Dataset()
    ds.file_meta = _file_meta(generate_uid(), ExplicitVRLittleEndian, sop_class)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    _common(ds, generate_uid(), generate_uid(), modality, modality, 99)
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def liver_result(image: sitk.Image, mask: np.ndarray) -> SegmentationResult:
    return SegmentationResult(image, [ClassResult(default_registry()["liver"], mask, 0.9)], "test-model")


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for `path` (dicom3tools); skips the test when dciodvfy is not installed."""
    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) not installed")
    run = subprocess.run([binary, str(path)], capture_output=True, text=True, encoding="utf-8", timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def read_quietly(path: Path, **kwargs) -> tuple[sitk.Image, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(path, **kwargs)
    return image, [str(w.message) for w in caught if issubclass(w.category, DicomSeriesWarning)]


def check_seg(path: Path, sources: list[Path], mask: np.ndarray, slices: list[int]) -> None:
    """The SEG passes dciodvfy, reads back with highdicom, and holds `mask[slices]` on those source instances."""
    import highdicom as hd

    assert dciodvfy_errors(path) == []
    seg = hd.seg.segread(path)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in sources]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], assert_missing_frames_are_empty=True)
    assert np.array_equal(pixels[..., 0].astype(bool), mask[slices])
    assert seg.SegmentSequence[0].TrackingID == "liver"


# --- reading ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless, RLELossless, JPEGLosslessSV1],
                         ids=["j2k", "jpeg-ls", "rle", "jpeg-lossless"])
def test_compressed_series_reads_like_the_image(crop, tmp_path, capfd, syntax):
    # JPEG Lossless has no pydicom decoder in our dependencies: SimpleITK's GDCM decodes it, silently
    image, _ = crop
    files = write_series(tmp_path / "s", image, transfer_syntax=syntax)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == syntax
    capfd.readouterr()
    read, said = read_quietly(tmp_path / "s")
    assert said == [] and capfd.readouterr().err == ""
    assert np.array_equal(sitk.GetArrayViewFromImage(read), sitk.GetArrayViewFromImage(image))
    assert read.GetPixelID() == sitk.sitkInt16
    np.testing.assert_allclose(read.GetSpacing(), image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(read.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(read.GetDirection(), image.GetDirection(), atol=1e-6)


def test_undecodable_pixels_give_one_line_naming_the_file(crop, tmp_path, capfd):
    from pydicom.encaps import encapsulate

    image, _ = crop
    files = write_series(tmp_path / "s", image, transfer_syntax=JPEG2000Lossless)
    broken = pydicom.dcmread(files[3])
    broken.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])  # a J2K codestream cut after its start
    broken.save_as(files[3], enforce_file_format=True)
    capfd.readouterr()
    with pytest.raises(InputError, match=f"cannot decode the pixels of {files[3]} \\(JPEG 2000 Image Compression "
                                         "\\(Lossless Only\\)\\): .*J2K.*; the file is damaged") as info:
        read_image(tmp_path / "s")
    assert "\n" not in str(info.value)
    assert capfd.readouterr().err == ""  # neither pydicom's nor GDCM's own messages reach the user


def test_jpeg2000_series_with_empty_sop_class_gets_a_valid_dicom_seg(crop, tmp_path):
    # The real scanner export of issue 22: JPEG 2000, SOP Class UID only in the file meta header.
    image, liver = crop
    files = write_series(tmp_path / "s", image, transfer_syntax=JPEG2000Lossless, empty_sop_class=True)
    read = read_image(tmp_path / "s")
    assert dicom_source_files(read) == [f.resolve() for f in files]
    assert dicom_seg_refusal(files) is None
    out = write_outputs(liver_result(read, liver), tmp_path / "out", "dicom-seg,seg.nrrd")
    check_seg(out["dicom-seg"], files, liver, list(range(12)))
    referenced = pydicom.dcmread(out["dicom-seg"]).ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert referenced.ReferencedSOPClassUID == CT_IMAGE_STORAGE


def test_pydicom_ct_small_is_decoded_with_its_rescale_and_geometry(tmp_path):
    # A real scanner slice (pydicom's test file): one slice is no 3D scan, but its pixels and geometry
    # must come out as pydicom reads them.
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_rescale

    source = Path(get_testdata_file("CT_small.dcm"))
    shutil.copy(source, tmp_path / "CT_small.dcm")
    ds = pydicom.dcmread(source)
    image = read_stack(find_series(tmp_path))
    assert np.array_equal(sitk.GetArrayFromImage(image)[0], apply_rescale(ds.pixel_array, ds))
    np.testing.assert_allclose(image.GetOrigin(), [float(v) for v in ds.ImagePositionPatient])
    assert image.GetSpacing()[:2] == (float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]))
    with pytest.raises(InputError, match="single slice is not a 3D scan"):
        read_image(tmp_path / "CT_small.dcm")


@pytest.mark.parametrize("name", ["MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm",
                                  "MR_small_bigendian.dcm"])
def test_pydicom_compressed_files_decode_like_their_uncompressed_original(tmp_path, name):
    # Real files compressed by other encoders (pydicom's test data): the same slice as MR_small.dcm
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_rescale

    shutil.copy(get_testdata_file(name), tmp_path / name)
    original = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    image = read_stack(find_series(tmp_path))
    assert np.array_equal(sitk.GetArrayFromImage(image)[0], apply_rescale(original.pixel_array, original))


def test_pydicom_sr_and_rt_dose_files_are_skipped(crop, tmp_path):
    # Real non-anatomy objects next to a CT: an SR document and RT dose grids (one with image geometry)
    from pydicom.data import get_testdata_file

    for name in ("test-SR.dcm", "rtdose_rle_1frame.dcm", "rtdose_rle.dcm"):
        shutil.copy(get_testdata_file(name), tmp_path / name)
    with pytest.raises(InputError, match="without a DICOM image series: it holds only ") as info:
        read_image(tmp_path)
    skipped = set(str(info.value).split("holds only ")[1].split("; "))
    assert skipped == {"RT Dose Storage (2 files)", "Comprehensive SR Storage (1 file)"}
    write_series(tmp_path, crop[0])
    read, said = read_quietly(tmp_path)
    assert said == [] and read.GetSize() == crop[0].GetSize()


def test_broken_geometry_is_skipped_and_named(crop, tmp_path):
    image, _ = crop
    files = write_series(tmp_path / "s", image)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = ds.ImagePositionPatient[:2]  # two numbers where three belong
        ds.save_as(f, enforce_file_format=True)
    with pytest.raises(InputError, match="holds only image with broken geometry: position, orientation or "
                                         "pixel spacing \\(12 files\\)"):
        read_image(tmp_path / "s")


@pytest.mark.parametrize("which", [0, 5, -1])
def test_a_slice_cut_inside_its_header_is_refused_not_dropped_or_filled(crop, tmp_path, which):
    # pydicom reads a file cut inside its header without complaint (only the file meta is left): at an
    # end of the stack the series silently lost a slice, in its middle the slice was "filled"
    files = write_series(tmp_path / "s", crop[0])
    files[which].write_bytes(files[which].read_bytes()[:300])
    with pytest.raises(InputError, match=f"{files[which].name} is a damaged DICOM file .*may be incomplete"):
        read_image(tmp_path / "s")
    with pytest.raises(InputError, match="is a damaged DICOM file"):
        read_image(files[which - 1])  # one intact file of the series: its folder is the series


def test_dicom_without_part10_header_is_named_as_such(crop, tmp_path):
    # Old or raw exports: the dataset without the 128-byte preamble, "DICM" and the file meta. The folder was
    # "none of its files is a DICOM file"; one file was read by GDCM as a lone 2D slice
    from pydicom.data import get_testdata_file

    (tmp_path / "raw").mkdir()
    for f in write_series(tmp_path / "s", crop[0]):
        data = f.read_bytes()
        meta_length = int.from_bytes(data[140:144], "little")  # (0002,0000) UL, explicit VR, right after "DICM"
        (tmp_path / "raw" / f.stem).write_bytes(data[144 + meta_length:])
    for path, what in ((tmp_path / "raw", "raw holds DICOM"), (tmp_path / "raw" / "ct_003", "ct_003 is DICOM"),
                       (Path(get_testdata_file("ExplVR_LitEndNoMeta.dcm")), "ExplVR_LitEndNoMeta.dcm is DICOM")):
        with pytest.raises(InputError, match=f"{what} without the Part 10 file header .*dcmconv"):
            read_image(path)


def test_slices_with_different_pixel_spacings_are_refused(crop, tmp_path):
    # Two reconstructions (fields of view) under one series UID: the volume took the first slice's spacing
    files = write_series(tmp_path / "s", crop[0])
    for f in files[4:]:
        ds = pydicom.dcmread(f)
        ds.PixelSpacing = [0.7, 0.7]
        ds.save_as(f, enforce_file_format=True)
    with pytest.raises(InputError, match=r"slices have different pixel spacings \(0.7 x 0.7 mm \(\d+ slices\), "):
        read_image(tmp_path / "s")


def test_a_slice_with_a_wrong_matrix_size_is_refused_naming_it_not_shown_as_a_second_series(crop, tmp_path):
    # One file's Rows says 100 where its pixels and the other slices are 101 rows: it made a second "series"
    # with the same UID (a 1-slice stack beside an 11-slice one with a filled gap)
    files = write_series(tmp_path / "s", crop[0])
    ds = pydicom.dcmread(files[5])
    ds.Rows = 100
    ds.save_as(files[5], enforce_file_format=True)
    assert len(scan_folder(tmp_path / "s").stacks) == 1
    expected = (rf"DICOM series {pydicom.dcmread(files[0]).SeriesInstanceUID}: {re.escape(str(files[5]))} is 100x122 "
                r"pixels \(Rows x Columns\) where the other 11 slices are 101x122; its header is wrong")
    for path in (tmp_path / "s", files[0], files[5]):
        with pytest.raises(InputError, match=expected):
            read_image(path)


def test_slices_in_two_frames_of_reference_are_refused_naming_both(crop, tmp_path, capsys, no_model_run):
    # Two acquisitions under one series UID: their positions happen to continue each other, so the slices
    # stacked into one volume without complaint
    files = write_series(tmp_path / "s", crop[0])
    first, second = pydicom.dcmread(files[0]).FrameOfReferenceUID, generate_uid()
    for f in files[8:]:
        ds = pydicom.dcmread(f)
        ds.FrameOfReferenceUID = second
        ds.save_as(f, enforce_file_format=True)
    with pytest.raises(InputError, match=rf"its slices lie in 2 frames of reference \({first} \(8 slices\), "
                                         rf"{second} \(4 slices\)\); a scanner never mixes frames"):
        read_image(tmp_path / "s")
    code, err = _cli(["predict", str(tmp_path / "s"), "-o", str(tmp_path / "out"), "--formats", "seg.nrrd"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("universalseg: error: DICOM series") \
        and "2 frames of reference" in err[0], err
    assert not (tmp_path / "out").exists()


def test_one_missing_slice_is_filled_without_shifting_the_others(crop, tmp_path):
    image, liver = crop
    files = write_series(tmp_path / "s", image, drop=(5,))
    read, said = read_quietly(tmp_path / "s")
    z5 = image.TransformIndexToPhysicalPoint((0, 0, 5))[2]
    assert len(said) == 1 and "1 missing slice" in said[0] and f"{z5:.2f}" in said[0]
    original, got = sitk.GetArrayFromImage(image).astype(np.float32), sitk.GetArrayFromImage(read)
    assert got.shape == original.shape
    kept = [k for k in range(12) if k != 5]
    assert np.array_equal(got[kept], original[kept])  # every slice after the gap stays where it was
    np.testing.assert_allclose(got[5], (original[4] + original[6]) / 2, atol=0.5)  # interpolated, whole HU
    assert read.GetPixelID() == sitk.sitkInt16
    np.testing.assert_allclose(read.GetSpacing()[2], image.GetSpacing()[2], atol=1e-4)
    # the SEG has a frame for every source file and none for the filled slice
    out = write_outputs(liver_result(read, liver), tmp_path / "out", "dicom-seg")
    check_seg(out["dicom-seg"], files, liver, kept)


def test_two_missing_slices_are_refused_naming_the_positions(crop, tmp_path):
    image, _ = crop
    write_series(tmp_path / "s", image, drop=(5, 6))
    z4, z7 = (image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in (4, 7))
    with pytest.raises(InputError, match=f"2 slices are missing \\(between {z4:.2f} and {z7:.2f} mm"):
        read_image(tmp_path / "s")


def test_uneven_spacing_is_refused_naming_the_positions(crop, tmp_path):
    image, _ = crop
    z = [image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(12)]
    uneven = [*z[:6], *(v + 1.2 for v in z[6:])]  # a 4.2 mm step among 3 mm ones
    write_series(tmp_path / "s", image, positions=uneven)
    with pytest.raises(InputError, match="uneven slice spacing \\(gaps of 3.00, 4.20 mm\\)") as info:
        read_image(tmp_path / "s")
    assert f"{uneven[6]:.2f}" in str(info.value) and "\n" not in str(info.value)


def test_duplicate_positions_and_tilted_stacks_are_refused(crop, tmp_path):
    image, _ = crop
    z = [image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(12)]
    write_series(tmp_path / "dup", image, positions=[*z[:6], z[5], *z[7:]])
    with pytest.raises(InputError, match=f"two slices lie at the same position \\({z[5]:.2f} mm"):
        read_image(tmp_path / "dup")
    write_series(tmp_path / "tilt", image, shift_per_slice=0.5)  # 5.5 mm over the stack: a tilted gantry
    with pytest.raises(InputError, match="shifted sideways from one to the next \\(up to 5.50 mm"):
        read_image(tmp_path / "tilt")
    write_series(tmp_path / "rounded", image, shift_per_slice=0.01)  # 0.11 mm: rounding, read as a straight stack
    assert read_image(tmp_path / "rounded").GetSize() == image.GetSize()


def test_two_series_the_larger_ct_is_used_and_named_and_the_other_can_be_picked(crop, tmp_path):
    image, _ = crop
    big = write_series(tmp_path / "s", image, description="Abdomen 3mm", prefix="a")
    small = write_series(tmp_path / "s", image[:, :, :10], description="Abdomen part", prefix="b")
    big_uid, small_uid = (pydicom.dcmread(f[0]).SeriesInstanceUID for f in (big, small))
    read, said = read_quietly(tmp_path / "s")
    assert read.GetSize()[2] == 12
    assert len(said) == 1 and f"using {big_uid} (CT, 12 slices, 'Abdomen 3mm')" in said[0]
    assert f"{small_uid} (CT, 10 slices, 'Abdomen part')" in said[0] and "--series UID" in said[0]
    read, said = read_quietly(tmp_path / "s", series_uid=small_uid)
    assert read.GetSize()[2] == 10 and said == []
    assert dicom_source_files(read) == [f.resolve() for f in small]
    with pytest.raises(InputError, match=f"series 1.2.3 is not among the image series of .*{big_uid}"):
        read_image(tmp_path / "s", series_uid="1.2.3")
    with pytest.raises(InputError, match="is not DICOM"):
        read_image(shared("ct-abdomen", "ct_small.nii.gz"), series_uid=small_uid)


def test_localiser_and_non_image_objects_are_skipped(crop, tmp_path):
    image, _ = crop
    files = write_series(tmp_path / "s", image)
    write_localiser(tmp_path / "s", files[0])
    write_non_image(tmp_path / "s", SR_STORAGE, "SR", "dose_report.dcm")
    write_non_image(tmp_path / "s", SEG_STORAGE, "SEG", "seg.dcm")
    (tmp_path / "s" / "DICOMDIR.txt").write_text("not DICOM")
    read, said = read_quietly(tmp_path / "s")
    assert said == [] and read.GetSize()[2] == 12
    assert dicom_source_files(read) == [f.resolve() for f in files]
    # the scout given as the input file: named, not read
    with pytest.raises(InputError, match="scout.dcm is not a slice of an image series \\(localiser\\)"):
        read_image(tmp_path / "s" / "scout.dcm")
    for f in files:
        f.unlink()
    with pytest.raises(InputError, match="without a DICOM image series: it holds only ") as info:
        read_image(tmp_path / "s")
    assert {"localiser (1 file)", "Comprehensive SR Storage (1 file)", "Segmentation Storage (1 file)"} == set(
        str(info.value).split("holds only ")[1].split("; "))


def test_folders_without_dicom_give_one_line_and_no_itk_output(tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("not an image\n")
    with pytest.raises(InputError, match="without a DICOM series \\(it is empty\\)"):
        read_image(tmp_path / "empty")
    with pytest.raises(InputError, match="none of its 1 files \\(e.g. notes.txt\\) is a DICOM file"):
        read_image(tmp_path / "text")
    (tmp_path / "export" / "IMG0001").mkdir(parents=True)  # a DICOMDIR-style export: series in subfolders
    with pytest.raises(InputError, match="subfolders such as IMG0001 are not searched"):
        read_image(tmp_path / "export")
    from pydicom.data import get_testdata_file

    shutil.copy(get_testdata_file("DICOMDIR", read=False), tmp_path / "export" / "DICOMDIR")  # a CD's index at the top
    with pytest.raises(InputError, match="holds only Media Storage Directory Storage \\(1 file\\); subfolders such "
                                         "as IMG0001 are not searched"):
        read_image(tmp_path / "export")
    damaged = tmp_path / "damaged.dcm"
    damaged.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    with pytest.raises(InputError, match="damaged.dcm is not a slice of an image series \\(DICOM file without "
                                         "image data\\)"):
        read_image(damaged)
    captured = capfd.readouterr()  # ITK prints from C++ straight to the file descriptors
    assert captured.out == "" and captured.err == ""


# --- DICOM SEG: possible or refused before the model runs ------------------------------------------------


def test_series_without_frame_of_reference_reads_but_refuses_dicom_seg(crop, tmp_path):
    image, liver = crop
    files = write_series(tmp_path / "s", image, frame_of_reference=False)
    read = read_image(tmp_path / "s")
    assert "no Frame of Reference UID" in dicom_seg_refusal(files)
    with pytest.raises(InputError, match="DICOM SEG output \\(dicom-seg\\) is impossible for this input: the "
                                         "source DICOM series has no Frame of Reference UID"):
        write_outputs(liver_result(read, liver), tmp_path / "out", "seg.nrrd,dicom-seg")
    assert not (tmp_path / "out").exists()
    write_outputs(liver_result(read, liver), tmp_path / "out", "seg.nrrd")  # the other formats are fine


@pytest.fixture
def no_model_run(monkeypatch):
    """Fail the test if the CLI reaches the model: the refusals below must come first."""
    import UniversalSegLib.inference.predict as predict_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("the model ran before the refusal")

    monkeypatch.setattr(predict_module, "predict", must_not_run)


def _cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(argv)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_cli_refuses_an_impossible_dicom_seg_before_the_model(crop, tmp_path, capsys, no_model_run):
    image, _ = crop
    write_series(tmp_path / "s", image, frame_of_reference=False)
    code, err = _cli(["predict", str(tmp_path / "s"), "-o", str(tmp_path / "out"), "--formats", "dicom-seg"], capsys)
    assert code == 2 and len(err) == 1 and "no Frame of Reference UID" in err[0], err
    code, err = _cli(["predict", str(tmp_path / "s"), "-o", str(tmp_path / "out"), "--series", "1.2.3"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("universalseg: error: series 1.2.3 is not among"), err
    assert not (tmp_path / "out").exists()


def test_cli_names_the_series_it_uses_in_one_line(crop, tmp_path, capsys, no_model_run):
    image, _ = crop
    big = write_series(tmp_path / "s", image, frame_of_reference=False, prefix="a")
    write_series(tmp_path / "s", image[:, :, :10], prefix="b")
    uid = pydicom.dcmread(big[0]).SeriesInstanceUID
    code, err = _cli(["predict", str(tmp_path / "s"), "-o", str(tmp_path / "out"), "--formats", "dicom-seg"], capsys)
    assert code == 2 and len(err) == 2, err
    assert err[0].startswith(f"universalseg: warning: {tmp_path / 's'} holds 2 image series; using {uid} (CT, 12 "
                             "slices, 'Abdomen 3mm'), the one with the most CT slices; also there: ")
    assert err[1].startswith("universalseg: error: DICOM SEG output (dicom-seg) is impossible for this input")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, minilm) -> Path:
    """A user model folder with a tiny random-weight model: these tests check files, not segmentation quality."""
    import torch

    from UniversalSegLib.store import create_model, save_model

    torch.manual_seed(1)
    model, manifest = create_model("tiny-dicom", ["liver", "spleen"], backbone_config={
        "init_filters": 16, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}, text_encoder=minilm)
    manifest.preprocessing.spacing = [9.0, 9.0, 9.0]
    manifest.preprocessing.patch_size = [32, 32, 32]
    folder = tmp_path_factory.mktemp("dicom_models")
    save_model(model, manifest, folder / "tiny-dicom")
    return folder


def test_cli_default_formats_without_frame_of_reference_warns_and_writes_the_rest(crop, tmp_path, capsys,
                                                                                  tiny_model_dir, monkeypatch):
    monkeypatch.setenv("UNIVERSALSEG_MODELS", str(tiny_model_dir))
    image, _ = crop
    write_series(tmp_path / "s", image, frame_of_reference=False)
    out = tmp_path / "out"
    code, err = _cli(["predict", str(tmp_path / "s"), "-o", str(out), "--model", "tiny-dicom", "--device", "cpu",
                      "--progress-json"], capsys)
    assert code == 0, err
    assert err == ["universalseg: warning: DICOM SEG output (dicom-seg) is impossible for this input: the source "
                   "DICOM series has no Frame of Reference UID (12 of 12 files, e.g. ct_000.dcm), which a DICOM SEG "
                   "must reference; writing seg.nrrd, nifti, stats without it"]
    assert sorted(p.name for p in out.iterdir()) == ["masks", "segmentation.seg.nrrd", "statistics.csv",
                                                     "statistics.json"]


def test_cli_series_option_picks_the_series_and_its_dicom_seg(crop, tmp_path, capsys, tiny_model_dir, monkeypatch):
    import highdicom as hd

    monkeypatch.setenv("UNIVERSALSEG_MODELS", str(tiny_model_dir))
    image, _ = crop
    write_series(tmp_path / "s", image, prefix="a")
    small = write_series(tmp_path / "s", image[:, :, 2:12], prefix="b", transfer_syntax=JPEG2000Lossless,
                         empty_sop_class=True)
    write_localiser(tmp_path / "s", small[0])
    uid = pydicom.dcmread(small[0]).SeriesInstanceUID
    out = tmp_path / "out"
    code, err = _cli(["predict", str(tmp_path / "s"), "-o", str(out), "--model", "tiny-dicom", "--device", "cpu",
                      "--series", uid, "--progress-json"], capsys)
    assert code == 0 and err == [], err
    seg_path = out / "segmentation.dcm"
    assert dciodvfy_errors(seg_path) == []
    seg = hd.seg.segread(seg_path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert sitk.ReadImage(str(out / "masks" / "liver.nii.gz")).GetSize() == (122, 101, 10)


def test_api_predict_takes_series_uid(crop, tmp_path, tiny_model_dir, monkeypatch):
    import UniversalSegLib as us

    monkeypatch.setenv("UNIVERSALSEG_MODELS", str(tiny_model_dir))
    image, _ = crop
    write_series(tmp_path / "s", image, prefix="a")
    small = write_series(tmp_path / "s", image[:, :, :9], prefix="b")
    uid = pydicom.dcmread(small[0]).SeriesInstanceUID
    with warnings.catch_warnings():
        warnings.simplefilter("error", DicomSeriesWarning)  # naming the series: no warning
        result = us.predict(tmp_path / "s", model="tiny-dicom", device="cpu", series_uid=uid)
    assert result.reference.GetSize()[2] == 9 and dicom_source_files(result.reference)[0] == small[0].resolve()
    with pytest.raises(InputError, match="series_uid selects a series of a DICOM folder"):
        us.predict(image, model="tiny-dicom", device="cpu", series_uid=uid)
