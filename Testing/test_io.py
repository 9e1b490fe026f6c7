"""Image reading/checking and every output writer, on the real CT volumes of ../shared/data."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import slicerio
from conftest import shared
from scipy import ndimage
from support import write_dicom_series

from UniversalSegLib.errors import InputError
from UniversalSegLib.geometry import full_mask, ijk_to_lps, mask_parts
from UniversalSegLib.inference.result import ClassResult, SegmentationResult
from UniversalSegLib.io import (
    atomic_write,
    compute_statistics,
    dicom_source_files,
    merge_label_map,
    read_image,
    write_class_masks,
    write_label_map,
    write_outputs,
    write_preview,
    write_seg_nrrd,
)
from UniversalSegLib.io import writers as writers_module
from UniversalSegLib.io.dicomseg import _sources_by_slice
from UniversalSegLib.io.image import NonCTWarning
from UniversalSegLib.io.preview import _lps_view
from UniversalSegLib.io.segnrrd import pack_layers
from UniversalSegLib.io.stats import LOW_CONFIDENCE
from UniversalSegLib.registry import default_registry

REG = default_registry()
# TotalSegmentator v2 label ids in ct-abdomen/labels_totalsegmentator_v2.nii.gz
LIVER, SPLEEN, KIDNEY_LEFT, AORTA = 5, 1, 3, 52


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _assert_same_geometry(a: sitk.Image, b: sitk.Image, atol: float = 1e-6) -> None:
    assert a.GetSize() == b.GetSize()
    for x, y in zip(_geometry(a)[1:], _geometry(b)[1:]):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def abdomen() -> SegmentationResult:
    """The RAS-on-disk abdomen CT with liver, an overlapping fake liver tumour, spleen, left kidney, aorta, and
    an empty pancreas tumour (looked for, not found)."""
    ct = read_image(shared("ct-abdomen", "ct.nii.gz"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(shared("ct-abdomen", "labels_totalsegmentator_v2.nii.gz"))))
    liver = labels == LIVER
    tumour = ndimage.binary_erosion(liver, iterations=3)  # inside the liver: a real overlap
    classes = [ClassResult(REG["liver"], liver, 0.91), ClassResult(REG["liver_tumor"], tumour, 0.72),
               ClassResult(REG["spleen"], labels == SPLEEN, 0.95),
               ClassResult(REG["kidney_left"], labels == KIDNEY_LEFT, 0.88),
               ClassResult(REG["aorta"], labels == AORTA, 0.8),
               ClassResult(REG["pancreas_tumor"], np.zeros_like(liver), 0.0)]
    return SegmentationResult(ct, classes, "test-model")


@pytest.fixture(scope="module")
def thorax() -> SegmentationResult:
    """The LPS thorax angiogram with two of its binary masks."""
    ct = read_image(shared("ct-thorax-aorta", "ct.nii.gz"))
    classes = []
    for key in ("aorta", "vertebrae_T12"):
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(shared("ct-thorax-aorta", "masks", f"{key}.nii.gz")))) > 0
        classes.append(ClassResult(REG[key], mask, 0.9))
    return SegmentationResult(ct, classes, "test-model")


# --- reading and checking --------------------------------------------------------------------------------


def test_every_shared_ct_is_accepted_and_mr_is_refused():
    for path in sorted(shared().glob("ct-*/ct.nii.gz")) + [shared("ct-abdomen", "ct_small.nii.gz")]:
        image = read_image(path)
        assert image.GetDimension() == 3 and image.GetNumberOfComponentsPerPixel() == 1
    mr = shared("mr-abdomen", "mr_small.nii.gz")
    with pytest.raises(InputError, match="--allow-non-ct") as info:
        read_image(mr)
    assert "\n" not in str(info.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(mr, allow_non_ct=True)
    assert image.GetSize() == (117, 91, 20)
    assert any(issubclass(w.category, NonCTWarning) for w in caught)


def test_nrrd_and_mha_read_like_nifti(tmp_path):
    reference = read_image(shared("ct-thorax-aorta", "ct.nii.gz"))
    for name in ("ct.nrrd", "ct.mha"):
        sitk.WriteImage(reference, str(tmp_path / name))
        image = read_image(tmp_path / name)
        _assert_same_geometry(image, reference, atol=1e-9)
        assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(reference))


def _write(tmp_path: Path, name: str, array: np.ndarray, spacing=(1.5, 1.5, 1.5)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(tmp_path / name))
    return tmp_path / name


def _ct_like(shape=(20, 24, 24)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(-1000, 400, size=shape).astype(np.float32)


def _zero_spacing_nrrd(tmp_path: Path) -> Path:
    data = _ct_like().astype("<i2")
    header = ("NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 24 24 20\n"
              "space directions: (0,0,0) (0,1,0) (0,0,1)\nendian: little\nencoding: raw\nspace origin: (0,0,0)\n\n")
    path = tmp_path / "zero.nrrd"
    path.write_bytes(header.encode() + data.tobytes())
    return path


def _nan_ct(tmp_path: Path, name: str) -> Path:
    array = _ct_like()
    array[5, 5, 5] = np.nan
    array[6, 6, 6] = np.inf
    return _write(tmp_path, name, array)


BAD_INPUTS = {
    "missing": (lambda t: t / "nope.nii.gz", "does not exist"),
    "text file": (lambda t: _text(t, "notes.nii.gz"), "cannot read"),
    "unknown format": (lambda t: _text(t, "notes.txt"), "unsupported format"),
    "2D": (lambda t: _write(t, "slice.nii.gz", _ct_like()[0]), "2D"),
    "4D": (lambda t: _write4d(t), "4D"),
    "single slice": (lambda t: _write(t, "one.nii.gz", _ct_like((1, 24, 24))), "single slice"),
    "vector": (lambda t: _write_vector(t), "values per voxel"),
    "NaN NIfTI": (lambda t: _nan_ct(t, "nan.nii.gz"), "2 voxels are NaN"),  # ITK itself reads NaN as 0
    "NaN MHA": (lambda t: _nan_ct(t, "nan.mha"), "2 voxels are NaN"),
    "spacing 0": (_zero_spacing_nrrd, "spacing is zero"),
    "spacing 50 mm": (lambda t: _write(t, "thick.nii.gz", _ct_like(), (1.0, 1.0, 50.0)), "implausible voxel spacing"),
    "empty folder": (lambda t: t, "without a DICOM series"),
}


def _text(tmp_path: Path, name: str) -> Path:
    (tmp_path / name).write_text("not an image\n")
    return tmp_path / name


def _write4d(tmp_path: Path) -> Path:
    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([_ct_like()] * 3, axis=-1), np.eye(4)), path)
    return path


def _write_vector(tmp_path: Path) -> Path:
    scalar = sitk.GetImageFromArray(_ct_like())
    sitk.WriteImage(sitk.Compose([scalar] * 3), str(tmp_path / "rgb.nrrd"))
    return tmp_path / "rgb.nrrd"


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_one_line_input_errors(tmp_path, case):
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(InputError, match=expected) as info:
        read_image(path)
    assert "\n" not in str(info.value)


def test_good_synthetic_ct_passes_the_same_checks(tmp_path):
    # The bad-input cases above differ from this one in a single property each.
    assert read_image(_write(tmp_path, "ok.nii.gz", _ct_like())).GetSize() == (24, 24, 20)


# --- writers ---------------------------------------------------------------------------------------------


def test_seg_nrrd_round_trips_through_slicerio(abdomen, tmp_path):
    path = write_seg_nrrd(abdomen, tmp_path / "s.seg.nrrd")
    seg = slicerio.read_segmentation(str(path))
    assert [s["id"] for s in seg["segments"]] == abdomen.keys
    assert seg["voxels"].ndim == 4  # the overlap needed a second layer
    for c, segment in zip(abdomen.classes, seg["segments"]):
        assert segment["name"] == c.info.name
        np.testing.assert_allclose(segment["color"], np.array(c.info.color) / 255, atol=1e-5)
        assert segment["terminology"]["type"] == c.info.terminology["type"]
        assert segment["terminology"]["category"] == c.info.terminology["category"]
        mask = slicerio.segment_mask(seg, segment["id"]).T  # (i, j, k) -> (z, y, x)
        assert np.array_equal(mask, c.mask), c.info.key
    assert seg["segments"][3]["terminology"]["typeModifier"] == ["SCT", "7771000", "Left"]
    overlap = slicerio.segment_mask(seg, "liver") & slicerio.segment_mask(seg, "liver_tumor")
    assert overlap.sum() == abdomen["liver_tumor"].mask.sum() > 0
    assert not slicerio.segment_mask(seg, "pancreas_tumor").any()
    # Geometry: voxel (i, j, k) of the file is the same physical point as in the input image.
    np.testing.assert_allclose(seg["ijkToLPS"], ijk_to_lps(abdomen.reference), atol=1e-9)
    for ijk in [(0, 0, 0), (121, 0, 0), (5, 77, 100)]:
        point = seg["ijkToLPS"] @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(point[:3], abdomen.reference.TransformIndexToPhysicalPoint(ijk), atol=1e-6)
    # ITK's own NRRD reader agrees: same grid, the layers as vector components, liver in layer 0.
    itk = sitk.ReadImage(str(path))
    _assert_same_geometry(itk, abdomen.reference)
    assert itk.GetNumberOfComponentsPerPixel() == 2
    liver = seg["segments"][0]
    assert np.array_equal(sitk.GetArrayViewFromImage(itk)[..., liver["layer"]] == liver["labelValue"],
                          abdomen["liver"].mask)


def test_pack_layers_starts_a_new_layer_when_labels_run_out():
    masks = [np.zeros((4, 10, 30), bool) for _ in range(300)]  # 300 disjoint voxels
    for n, m in enumerate(masks):
        m.flat[n] = True
    boxed = [mask_parts(SimpleNamespace(mask=m)) for m in [*masks, masks[0] | masks[1]]]  # the last overlaps two
    layers, placement = pack_layers(boxed, (4, 10, 30))
    assert len(layers) == 2 and placement[254] == (0, 255) and placement[255] == (1, 1)
    assert placement[-1] == (1, 46)
    for m, (layer, label) in zip(masks, placement):
        assert np.array_equal(layers[layer] == label, m)


@pytest.mark.parametrize("case", ["abdomen", "thorax"])
def test_class_masks_keep_input_geometry(case, request, tmp_path):
    result = request.getfixturevalue(case)
    source = shared("ct-abdomen" if case == "abdomen" else "ct-thorax-aorta", "ct.nii.gz")
    files = write_class_masks(result, tmp_path / "masks")
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == sorted(f"{k}.nii.gz" for k in result.keys)
    source_affine = nib.load(source).affine
    for c in result.classes:
        image = sitk.ReadImage(str(files[c.info.key]))
        assert image.GetPixelID() == sitk.sitkUInt8
        _assert_same_geometry(image, result.reference)
        assert np.array_equal(sitk.GetArrayViewFromImage(image), c.mask.astype(np.uint8))
        # On disk, too: the mask's NIfTI affine is the input file's (RAS or LPS storage alike).
        np.testing.assert_allclose(nib.load(files[c.info.key]).affine, source_affine, atol=1e-4)


def test_label_map_paints_tiers_and_resolves_overlaps_by_confidence(abdomen, tmp_path):
    liver, tumour, aorta = abdomen["liver"].mask, abdomen["liver_tumor"].mask, abdomen["aorta"].mask
    # A second organ overlapping the liver: where it overlaps, the per-voxel probability decides.
    rival = ndimage.binary_dilation(abdomen["spleen"].mask, iterations=2) | liver
    liver_prob = np.full(liver.shape, 200, np.uint8)
    rival_prob = np.zeros(liver.shape, np.uint8)
    rival_prob[:, :, : liver.shape[2] // 2] = 250  # the rival wins on one side of the volume only
    classes = [ClassResult(REG["liver"], liver, 0.9, liver_prob), ClassResult(REG["liver_tumor"], tumour, 0.7),
               ClassResult(REG["gallbladder"], rival, 0.5, rival_prob), ClassResult(REG["aorta"], aorta, 0.1)]
    result = SegmentationResult(abdomen.reference, classes, "test-model")
    files = write_label_map(result, tmp_path / "labelmap.nii.gz")
    merged = sitk.GetArrayFromImage(sitk.ReadImage(str(files["labelmap"])))
    assert np.array_equal(merged, merge_label_map(result))
    assert np.all(merged[tumour] == 2)  # tumours over organs
    assert np.all(merged[aorta & ~tumour] == 4)  # vessels over organs despite low confidence
    left = np.zeros_like(liver)
    left[:, :, : liver.shape[2] // 2] = True
    organ_only = liver & ~tumour & ~aorta
    assert np.all(merged[organ_only & left] == 3) and np.all(merged[organ_only & ~left] == 1)
    assert np.all(merged[~(liver | tumour | rival | aorta)] == 0)
    # Equal confidence: the class listed first keeps the voxel.
    tie = SegmentationResult(abdomen.reference, [ClassResult(REG["spleen"], rival, 0.5),
                                                 ClassResult(REG["liver"], liver, 0.5)], "m")
    assert np.all(merge_label_map(tie)[rival] == 1)
    table = json.loads(files["labels"].read_text())
    assert [(e["value"], e["key"]) for e in table["labels"]] == [(1, "liver"), (2, "liver_tumor"),
                                                                 (3, "gallbladder"), (4, "aorta")]
    with open(files["colors"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["Name"] == "Liver" and [int(rows[0][f"Color_{x}"]) for x in "RGB"] == REG["liver"].color
    assert rows[1]["Region_CodeValue"] == "10200004"


def test_statistics_volumes_hu_and_border(abdomen, tmp_path):
    rows = {r["key"]: r for r in compute_statistics(abdomen)}
    hu = sitk.GetArrayViewFromImage(abdomen.reference)
    liver = abdomen["liver"].mask
    assert rows["liver"]["voxel_count"] == int(liver.sum())
    assert rows["liver"]["volume_ml"] == pytest.approx(liver.sum() * 27 / 1000)
    assert rows["liver"]["mean_hu"] == pytest.approx(44, abs=3)  # README sanity values
    assert rows["spleen"]["mean_hu"] == pytest.approx(32, abs=3)
    assert rows["liver"]["std_hu"] == pytest.approx(hu[liver].std(), rel=1e-6)
    assert rows["kidney_left"]["mean_confidence"] == pytest.approx(0.88)
    assert rows["kidney_left"]["low_confidence"] == (0.88 < LOW_CONFIDENCE)
    assert all(r["low_confidence"] == (not r["empty"] and r["mean_confidence"] < LOW_CONFIDENCE)
               for r in rows.values())
    assert not rows["pancreas_tumor"]["low_confidence"]  # nothing found is not "found with low confidence"
    # The liver reaches the edge of this crop; the kidney does not until we give it a voxel on the last slice.
    assert liver[:, :, -1].any() or liver[:, :, 0].any() or liver[0].any() or liver[-1].any()
    assert rows["liver"]["touches_border"] and not rows["kidney_left"]["touches_border"]
    cut_kidney = abdomen["kidney_left"].mask.copy()
    cut_kidney[-1, 50, 60] = True
    edited = SegmentationResult(abdomen.reference, [ClassResult(REG["kidney_left"], cut_kidney, 0.9)], "m")
    assert compute_statistics(edited)[0]["touches_border"]
    assert rows["pancreas_tumor"]["empty"] and rows["pancreas_tumor"]["mean_hu"] is None
    out = write_outputs(abdomen, tmp_path, ["stats"])
    with open(out["stats"], newline="") as f:
        table = {r["key"]: r for r in csv.DictReader(f)}
    assert float(table["liver"]["volume_ml"]) == pytest.approx(rows["liver"]["volume_ml"], abs=1e-3)
    document = json.loads(out["stats:json"].read_text())
    assert document["classes"][0]["voxel_count"] == rows["liver"]["voxel_count"]


def test_mask_parts_boxes_plain_and_compact_masks_alike(abdomen):
    liver = abdomen["liver"].mask
    slices, crop = mask_parts(SimpleNamespace(mask=liver))  # a plain array, boxed with scipy
    assert crop.shape == tuple(s.stop - s.start for s in slices) and crop.sum() == liver.sum()
    assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, :, -1].any()  # tight box
    assert np.array_equal(full_mask(slices, crop, liver.shape), liver)
    compact_slices, compact_crop = mask_parts(abdomen["liver"])  # whatever ClassResult stores
    assert compact_slices == slices and np.array_equal(compact_crop, crop)
    empty_slices, empty_crop = mask_parts(SimpleNamespace(mask=np.zeros_like(liver)))
    assert empty_crop.size == 0 and not full_mask(empty_slices, empty_crop, liver.shape).any()


def test_lps_view_matches_reoriented_image(abdomen):
    # The preview's no-copy reorientation must agree with ITK's own reorientation to LPS.
    view, spacing = _lps_view(sitk.GetArrayViewFromImage(abdomen.reference), abdomen.reference)
    oriented = sitk.DICOMOrient(abdomen.reference, "LPS")
    assert np.allclose(oriented.GetDirection(), np.eye(3).ravel())
    assert np.array_equal(view, sitk.GetArrayViewFromImage(oriented))
    assert spacing == tuple(reversed(oriented.GetSpacing()))


def test_preview_png_shows_coloured_masks(abdomen, tmp_path):
    import matplotlib.image

    path = write_preview(abdomen, tmp_path / "preview.png")
    rgba = matplotlib.image.imread(str(path))
    assert rgba.shape[0] > 300 and rgba.shape[1] > 3 * rgba.shape[0] / 2
    colourful = np.abs(rgba[..., 0] - rgba[..., 2]) > 0.2  # grey CT pixels have R == B
    assert colourful.sum() > 1000


def test_dicom_series_round_trip_and_dicom_seg(abdomen, tmp_path):
    import highdicom as hd

    files = write_dicom_series(abdomen.reference, tmp_path / "dicom")
    image = read_image(tmp_path / "dicom")
    _assert_same_geometry(image, abdomen.reference, atol=1e-4)  # DICOM decimal strings hold ~10 digits
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(abdomen.reference))
    assert dicom_source_files(image) == files == dicom_source_files(tmp_path / "dicom")
    result = SegmentationResult(image, abdomen.classes, "test-model")
    out = write_outputs(result, tmp_path / "out", "dicom-seg,seg.nrrd")  # sources found from the image itself
    seg = hd.seg.segread(out["dicom-seg"])
    assert [s.TrackingID for s in seg.SegmentSequence] == abdomen.keys
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    by_slice = _sources_by_slice(image, files[::-1])  # any file order works
    assert [by_slice[k].SOPInstanceUID for k in sorted(by_slice)] == uids
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=list(range(1, len(abdomen.classes) + 1)),
                                               assert_missing_frames_are_empty=True)
    for n, c in enumerate(abdomen.classes):
        assert np.array_equal(pixels[..., n].astype(bool), c.mask), c.info.key
    assert (pixels[..., 0] & pixels[..., 1]).sum() == abdomen["liver_tumor"].mask.sum()  # overlap kept


def test_dicom_seg_without_dicom_input_is_refused_before_writing(abdomen, tmp_path):
    with pytest.raises(InputError, match="needs a DICOM series"):
        write_outputs(abdomen, tmp_path, ["seg.nrrd", "dicom-seg"])
    with pytest.raises(InputError, match="unknown output format"):
        write_outputs(abdomen, tmp_path, ["seg.nrrd", "stl"])
    assert list(tmp_path.iterdir()) == []


def test_write_outputs_writes_every_format(abdomen, tmp_path):
    out = write_outputs(abdomen, tmp_path, ["seg.nrrd", "nifti", "labelmap", "stats", "preview"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["segmentation.seg.nrrd", "masks", "labelmap.nii.gz", "labelmap.labels.json",
                            "labelmap-colors.csv", "statistics.csv", "statistics.json", "preview.png"])
    assert all(p.exists() for p in out.values())
    assert len(list(out["nifti"].iterdir())) == len(abdomen.classes)


def test_a_failing_writer_leaves_no_files(abdomen, tmp_path, monkeypatch):
    old = tmp_path / "statistics.csv"
    old.write_text("previous run\n")

    def broken_statistics(result, csv_path, json_path):
        Path(csv_path).write_text("key,na")  # half a file, then the disk "fills up"
        raise OSError("No space left on device")

    monkeypatch.setattr(writers_module, "write_statistics", broken_statistics)
    with pytest.raises(OSError, match="No space"):
        write_outputs(abdomen, tmp_path, ["seg.nrrd", "nifti", "labelmap", "stats"])
    assert [p.name for p in tmp_path.iterdir()] == ["statistics.csv"]  # staging gone, nothing new
    assert old.read_text() == "previous run\n"
    with pytest.raises(OSError):
        write_outputs(abdomen, tmp_path / "new" / "out", ["nifti", "stats"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "statistics.csv"]
    assert list((tmp_path / "new").iterdir()) == []  # the output folder it created is gone again


def test_masks_folder_is_all_or_nothing(abdomen, tmp_path, monkeypatch):
    from UniversalSegLib.io import nifti

    calls, original = [], sitk.WriteImage

    def flaky_write(image, path, useCompression=False):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("disk error")
        original(image, path, useCompression)

    monkeypatch.setattr(nifti.sitk, "WriteImage", flaky_write)
    with pytest.raises(RuntimeError):
        write_class_masks(abdomen, tmp_path / "masks")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(ValueError), atomic_write(target) as tmp:
        tmp.write_text("new but incomp")
        raise ValueError("writer crashed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    with atomic_write(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
