"""Dataset specs and adapters: each public layout is written as a tiny phantom and read back.

The phantom is a 20x16x16 CT (1.5 mm) with box-shaped organs at known places: the patient's right is
high x (RAS). Each adapter test writes the phantom in that dataset's layout and label ids, then checks
the preprocessed multi-hot target channel by channel against the boxes (with the papers' rules:
tumours count as their host organ, side-less organs split into left/right).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import demo_spec, shared

from UniversalSegLib.data import (
    LabelMapSource,
    load_dataset_file,
    load_dataset_specs,
    preprocess_case,
    resolve_label_key,
    split_left_right,
)
from UniversalSegLib.data.adapters import TOTALSEG_NAMES
from UniversalSegLib.errors import InputError
from UniversalSegLib.registry import default_registry
from UniversalSegLib.store.manifest import Preprocessing

REPO = Path(__file__).resolve().parents[1]
SHAPE = (20, 16, 16)
SPACING = 1.5
NATIVE = Preprocessing(spacing=[SPACING] * 3, foreground_crop=False)
# (x, y, z) boxes in RAS voxel indices; no two overlap except a tumour inside (or touching) its host.
BOXES = {
    "liver": np.s_[11:18, 3:9, 6:13], "liver_tumor": np.s_[13:15, 4:6, 8:10],
    "spleen": np.s_[2:6, 3:7, 8:12],
    "kidney_right": np.s_[12:16, 10:13, 2:6], "kidney_left": np.s_[3:7, 10:13, 2:6],
    "kidney_tumor": np.s_[13:15, 11:12, 3:5],  # inside the right kidney
    "kidney_cyst": np.s_[5:7, 12:14, 2:4],  # on the left kidney, bulging out of it
    "adrenal_gland_right": np.s_[12:14, 10:12, 7:9], "adrenal_gland_left": np.s_[5:7, 10:12, 7:9],
    "lung_right": np.s_[11:18, 2:12, 13:15], "lung_left": np.s_[2:8, 2:12, 13:15],
    "aorta": np.s_[9:11, 9:11, 1:15], "urinary_bladder": np.s_[8:12, 3:6, 1:3],
    "femur_head_left": np.s_[3:5, 5:8, 1:3], "femur_head_right": np.s_[15:17, 5:8, 1:3],
    "pancreas": np.s_[8:11, 6:8, 8:10],
}
HOST = {"liver_tumor": "liver", "kidney_tumor": "kidney_right", "kidney_cyst": "kidney_left"}
PAIRS = {"kidney": ("kidney_left", "kidney_right"), "lung": ("lung_left", "lung_right"),
         "adrenal_gland": ("adrenal_gland_left", "adrenal_gland_right")}
TUMOURS = ("liver_tumor", "kidney_tumor", "kidney_cyst")


def box(name: str) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    for part in PAIRS.get(name, (name,)):
        mask[BOXES[part]] = True
    return mask


def phantom_ct() -> np.ndarray:
    image = np.full(SHAPE, -1000, np.int16)
    image[1:19, 1:15, 1:15] = 40
    for name in BOXES:
        image[box(name)] = 60 + 10 * list(BOXES).index(name)
    return image


def label_map(ids: dict[str, int]) -> np.ndarray:
    """A label map with the given {structure or side-less pair: value}; tumours painted last."""
    out = np.zeros(SHAPE, np.uint8)
    for name in sorted(ids, key=lambda n: n in TUMOURS):
        out[box(name)] = ids[name]
    return out


def write(path: Path, array: np.ndarray, lps: bool = False) -> Path:
    """Write an (x, y, z) RAS array; `lps` stores it flipped with an LPS affine (same world positions)."""
    origin = np.array([-15.0, -12.0, -12.0])
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = origin
    if lps:
        array = array[::-1, ::-1, :]
        affine = np.diag([-SPACING, -SPACING, SPACING, 1.0])
        affine[:3, 3] = origin + [SPACING * (SHAPE[0] - 1), SPACING * (SHAPE[1] - 1), 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def expected(key: str, painted: set[str]) -> np.ndarray:
    """Ground truth from the construction: the box, plus the boxes of painted tumours it hosts."""
    painted = {part for name in painted for part in PAIRS.get(name, (name,))}
    mask = box(key) if key in painted else np.zeros(SHAPE, bool)
    for tumour, host in HOST.items():
        if host == key and tumour in painted:
            mask |= box(tumour)
    return mask


def check_case(spec, classes: set[str], painted: set[str], case_index: int = 0, pre=NATIVE):
    """Preprocess one case with every registry class and compare all channels with the truth."""
    keys = default_registry().keys
    assert set(spec.classes) == classes
    image, labels, annotated = preprocess_case(spec.cases[case_index], spec, keys, pre)
    assert image.dtype == np.float16 and image.shape == SHAPE and 0 <= image.min() and image.max() <= 1
    assert labels.shape == (len(keys), *SHAPE) and annotated.shape == (len(keys),)
    for k, key in enumerate(keys):
        assert annotated[k] == (key in classes), key
        want = expected(key, painted) if key in classes else np.zeros(SHAPE, bool)
        assert np.array_equal(labels[k].astype(bool), want), key
    return labels


def load(tmp: Path, entry: dict) -> list:
    return load_dataset_specs([{"name": "d", **entry}], tmp)


# --- the paper's rules ------------------------------------------------------------------------------

def test_split_left_right_components_and_midline():
    mask = np.zeros((30, 8, 8), bool)
    mask[2:8, 2:6, 2:6] = True  # patient's left (low x)
    mask[20:27, 2:6, 2:6] = True  # right
    mask[9, 1, 1] = True  # a fragment nearer the left one
    left, right = split_left_right(mask)
    assert left[2:8, 2:6, 2:6].all() and left[9, 1, 1] and not left[15:].any()
    assert right[20:27, 2:6, 2:6].all() and not (left & right).any() and np.array_equal(left | right, mask)
    single = np.zeros((30, 8, 8), bool)
    single[10:20, 3:5, 3:5] = True  # one bridged component: cut at the midline
    left, right = split_left_right(single, midline=15)
    assert left[10:15, 3:5, 3:5].all() and right[15:20, 3:5, 3:5].all() and not left[15:].any()
    left, right = split_left_right(single, midline=25)  # entirely on the left of the midline
    assert np.array_equal(left, single) and not right.any()


def test_side_convention_on_real_kidneys(tmp_path):
    """Merge TotalSegmentator's kidney_right (2) and kidney_left (3) and recover both sides, also from
    an LPS-stored copy (the split must follow the patient, not the array)."""
    import SimpleITK as sitk

    ct = shared("ct-abdomen", "ct.nii.gz")
    labels = shared("ct-abdomen", "labels_totalsegmentator_v2.nii.gz")
    keys = ["kidney_left", "kidney_right"]
    pre = Preprocessing(spacing=[3.0] * 3, foreground_crop=False)
    truth = load(tmp_path, {"format": "plain", "root": str(ct.parent),
                            "label_map": {3: "kidney_left", 2: "kidney_right"},
                            "cases": [{"image": ct.name, "label": labels.name}]})[0]
    _, want, _ = preprocess_case(truth.cases[0], truth, keys, pre)
    assert want[0].sum() > 1000 and want[1].sum() > 1000
    for folder, orient in ((ct.parent, None), (tmp_path / "lps", "LPS"), (tmp_path / "pir", "PIR")):
        if orient:
            folder.mkdir()
            for f in (ct, labels):
                sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(f)), orient), str(folder / f.name))
        merged = load(tmp_path, {"format": "plain", "root": str(folder), "label_map": {2: "kidney", 3: "kidney"},
                                 "cases": [{"image": ct.name, "label": labels.name}]})[0]
        assert merged.classes == keys
        _, got, annotated = preprocess_case(merged.cases[0], merged, keys, pre)
        assert annotated.all() and np.array_equal(got, want), orient


# --- adapters ----------------------------------------------------------------------------------------

def test_msd_liver_task_with_tumour_in_host(tmp_path):
    root = tmp_path / "Task03_Liver"
    write(root / "imagesTr" / "liver_0.nii.gz", phantom_ct())
    write(root / "labelsTr" / "liver_0.nii.gz", label_map({"liver": 1, "liver_tumor": 2}))
    (root / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"macOS junk")
    (root / "dataset.json").write_text(json.dumps({
        "name": "Liver", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "training": [{"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}]}))
    spec = load(tmp_path, {"format": "msd", "root": str(root)})[0]
    assert [c.case_id for c in spec.cases] == ["liver_0"]
    check_case(spec, {"liver", "liver_tumor"}, {"liver", "liver_tumor"})


@pytest.mark.parametrize("task,labels,modality,classes", [
    ("Task08_HepaticVessel", {"1": "Vessel", "2": "Tumour"}, {"0": "CT"}, ["hepatic_vessel", "hepatic_vessel_tumor"]),
    ("Task10_Colon", {"1": "colon cancer primaries"}, {"0": "CT"}, ["colon_tumor"]),
    ("Task07_Pancreas", {"1": "pancreas", "2": "cancer"}, {"0": "CT"}, ["pancreas", "pancreas_tumor"]),
    ("Task06_Lung", {"1": "cancer"}, {"0": "CT"}, ["lung_tumor"]),
    ("Task02_Heart", {"1": "left atrium"}, {"0": "MRI"}, None),
])
def test_msd_task_label_names(tmp_path, task, labels, modality, classes):
    root = tmp_path / task
    write(root / "imagesTr" / "a_1.nii.gz", phantom_ct())
    write(root / "labelsTr" / "a_1.nii.gz", label_map({}))
    (root / "dataset.json").write_text(json.dumps({"name": task.split("_")[1], "modality": modality,
                                                   "labels": {"0": "background", **labels}}))
    if classes is None:
        with pytest.raises(InputError, match="CT only"):
            load(tmp_path, {"format": "msd", "root": str(root)})
    else:
        assert load(tmp_path, {"format": "msd", "root": str(root)})[0].classes == classes


def test_nnunet_v2_names_and_kidney_split(tmp_path):
    root = tmp_path / "Dataset001_Abdomen"
    ids = {"spleen": 1, "kidney": 2, "liver": 3, "urinary_bladder": 4}
    for cid in ("abd_001", "abd_002"):
        write(root / "imagesTr" / f"{cid}_0000.nii.gz", phantom_ct())
        write(root / "labelsTr" / f"{cid}.nii.gz", label_map(ids))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 2,
        "labels": {"background": 0, "spleen": 1, "kidney": 2, "liver": 3, "urinary bladder": 4}}))
    spec = load(tmp_path, {"format": "nnunet", "root": str(root), "split": {"val": ["abd_002"]}})[0]
    assert [c.case_id for c in spec.train_cases()] == ["abd_001"]
    assert [c.case_id for c in spec.val_cases()] == ["abd_002"]
    check_case(spec, {"spleen", "kidney_left", "kidney_right", "liver", "urinary_bladder"}, set(ids))


def test_btcv_layout(tmp_path):
    base = tmp_path / "RawData" / "Training"
    ids = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 6, "aorta": 8, "adrenal_gland_right": 12,
           "adrenal_gland_left": 13}
    write(base / "img" / "img0001.nii.gz", phantom_ct())
    write(base / "label" / "label0001.nii.gz", label_map(ids))
    write(base / "img" / "img0002.nii.gz", phantom_ct())  # no label: skipped with a note
    spec = load(tmp_path, {"format": "btcv", "root": str(tmp_path)})[0]
    assert [c.case_id for c in spec.cases] == ["0001"] and spec.notes
    btcv13 = {"spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach", "aorta",
              "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right",
              "adrenal_gland_left"}
    check_case(spec, btcv13, set(ids))


def test_amos_ct_only_and_validation_folder(tmp_path):
    ids = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 6, "aorta": 8, "adrenal_gland_right": 11,
           "adrenal_gland_left": 12, "urinary_bladder": 14}
    for folder, cid in (("Tr", "amos_0001"), ("Tr", "amos_0540"), ("Va", "amos_0008")):
        write(tmp_path / f"images{folder}" / f"{cid}.nii.gz", phantom_ct())
        write(tmp_path / f"labels{folder}" / f"{cid}.nii.gz", label_map(ids))
    spec = load(tmp_path, {"format": "amos", "root": str(tmp_path)})[0]
    assert [c.case_id for c in spec.cases] == ["amos_0001", "amos_0008"] and spec.holdout == ["amos_0008"]
    assert len(spec.classes) == 15
    check_case(spec, set(spec.classes), set(ids))


def test_kits23_lps_storage_kidney_split_with_tumour_and_cyst(tmp_path):
    case = tmp_path / "dataset" / "case_00000"
    write(case / "imaging.nii.gz", phantom_ct(), lps=True)
    write(case / "segmentation.nii.gz", label_map({"kidney": 1, "kidney_tumor": 2, "kidney_cyst": 3}), lps=True)
    (tmp_path / "dataset" / "kits23.json").write_text("[]")
    spec = load(tmp_path, {"format": "kits", "root": str(tmp_path)})[0]
    labels = check_case(spec, {"kidney_left", "kidney_right", "kidney_tumor", "kidney_cyst"},
                        {"kidney_left", "kidney_right", "kidney_tumor", "kidney_cyst"})
    keys = default_registry().keys
    assert labels[keys.index("kidney_left")][box("kidney_cyst")].all()  # the cyst joined the LEFT kidney


def test_kits19_has_no_cyst_class(tmp_path):
    case = tmp_path / "data" / "case_00000"
    write(case / "imaging.nii.gz", phantom_ct())
    write(case / "segmentation.nii.gz", label_map({"kidney": 1, "kidney_tumor": 2}))
    (tmp_path / "data" / "kits.json").write_text("[]")
    spec = load(tmp_path, {"format": "kits", "root": str(tmp_path)})[0]
    check_case(spec, {"kidney_left", "kidney_right", "kidney_tumor"}, {"kidney", "kidney_tumor"})


def test_lits_uncompressed_nifti(tmp_path):
    folder = tmp_path / "Training Batch 1"
    write(folder / "volume-7.nii", phantom_ct())
    write(folder / "segmentation-7.nii", label_map({"liver": 1, "liver_tumor": 2}))
    spec = load(tmp_path, {"format": "lits", "root": str(tmp_path)})[0]
    assert [c.case_id for c in spec.cases] == ["7"]
    check_case(spec, {"liver", "liver_tumor"}, {"liver", "liver_tumor"})


def test_word_adrenal_split(tmp_path):
    base = tmp_path / "WORD-V0.1.0"
    ids = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4, "adrenal_gland": 12, "urinary_bladder": 14,
           "femur_head_left": 15, "femur_head_right": 16}
    for folder in ("Tr", "Val"):
        write(base / f"images{folder}" / f"word_{folder}.nii.gz", phantom_ct())
        write(base / f"labels{folder}" / f"word_{folder}.nii.gz", label_map(ids))
    spec = load(tmp_path, {"format": "word", "root": str(tmp_path)})[0]
    assert spec.holdout == ["word_Val"] and len(spec.classes) == 17  # 16 organs, adrenal as two sides
    check_case(spec, set(spec.classes), {*ids, "adrenal_gland_left", "adrenal_gland_right"})


def test_abdomenct1k_kidney_split(tmp_path):
    write(tmp_path / "AbdomenCT-1K-ImagePart1" / "Case_00001_0000.nii.gz", phantom_ct())
    write(tmp_path / "Mask" / "Case_00001.nii.gz", label_map({"liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4}))
    spec = load(tmp_path, {"format": "abdomenct1k", "root": str(tmp_path)})[0]
    assert [c.case_id for c in spec.cases] == ["Case_00001"]
    check_case(spec, {"liver", "kidney_left", "kidney_right", "spleen", "pancreas"},
               {"liver", "kidney_left", "kidney_right", "spleen", "pancreas"})


def test_ctorg_lungs_and_kidneys_split_bone_ignored(tmp_path):
    folder = tmp_path / "OrganSegmentations"
    write(folder / "volume-3.nii.gz", phantom_ct())
    write(folder / "labels-3.nii.gz", label_map({"liver": 1, "urinary_bladder": 2, "lung": 3, "kidney": 4,
                                                 "femur_head_left": 5, "femur_head_right": 5}))
    spec = load(tmp_path, {"format": "ctorg", "root": str(tmp_path)})[0]
    check_case(spec, {"liver", "urinary_bladder", "lung_left", "lung_right", "kidney_left", "kidney_right"},
               {"liver", "urinary_bladder", "lung_left", "lung_right", "kidney_left", "kidney_right"})


def test_totalsegmentator_files_by_name(tmp_path):
    lobe = box("lung_left").copy()
    lobe[:, :, 14:] = False
    files = {"liver": box("liver"), "spleen": box("spleen"), "kidney_left": box("kidney_left"),
             "kidney_right": box("kidney_right"), "kidney_cyst_left": box("kidney_cyst"),
             "lung_lower_lobe_left": lobe, "lung_upper_lobe_left": box("lung_left") & ~lobe,
             "small_bowel": np.zeros(SHAPE, bool), "brain_stem_xyz": box("aorta")}
    for sid in ("s0001", "s0002", "s0003"):
        write(tmp_path / sid / "ct.nii.gz", phantom_ct())
        for name, mask in files.items():
            write(tmp_path / sid / "segmentations" / f"{name}.nii.gz", mask.astype(np.uint8))
    (tmp_path / "meta.csv").write_text("image_id;age;split\ns0001;50;train\ns0002;60;val\ns0003;70;test\n")
    spec = load(tmp_path, {"format": "totalsegmentator", "root": str(tmp_path), "split": "meta"})[0]
    assert [c.case_id for c in spec.cases] == ["s0001", "s0002"] and spec.holdout == ["s0002"]
    assert any("brain_stem_xyz" in n for n in spec.notes)
    check_case(spec, {"liver", "spleen", "kidney_left", "kidney_right", "kidney_cyst", "lung_left", "intestine"},
               {"liver", "spleen", "kidney_left", "kidney_right", "kidney_cyst", "lung_left"})


def test_plain_folders_and_masks_on_another_grid(tmp_path):
    write(tmp_path / "images" / "p1_0000.nii.gz", phantom_ct())
    write(tmp_path / "labels" / "p1.nii.gz", label_map({"liver": 1, "kidney_left": 2, "aorta": 3}))
    spec = load(tmp_path, {"format": "plain", "root": str(tmp_path),
                           "label_map": {1: "Liver", 2: "left kidney", 3: "aorta", 9: None}})[0]
    assert [c.case_id for c in spec.cases] == ["p1"]
    check_case(spec, {"liver", "kidney_left", "aorta"}, {"liver", "kidney_left", "aorta"})
    # A mask stored LPS on its own grid is brought onto the image grid.
    write(tmp_path / "masks" / "spleen.nii.gz", box("spleen").astype(np.uint8), lps=True)
    spec = load(tmp_path, {"format": "plain", "root": str(tmp_path), "cases": [
        {"id": "c", "image": "images/p1_0000.nii.gz", "masks": {"spleen": "masks/spleen.nii.gz",
                                                                "liver_tumor": ["labels/p1.nii.gz"]}}]})[0]
    assert spec.classes == ["spleen", "liver_tumor"]
    _, labels, _ = preprocess_case(spec.cases[0], spec, ["spleen"], NATIVE)
    assert np.array_equal(labels[0].astype(bool), box("spleen"))


def test_classes_subset_and_resampling(tmp_path):
    write(tmp_path / "images" / "p1.nii.gz", phantom_ct())
    write(tmp_path / "labels" / "p1.nii.gz", label_map({"liver": 1, "kidney": 2, "liver_tumor": 3}))
    spec = load(tmp_path, {"format": "plain", "root": str(tmp_path), "classes": ["kidney_right", "liver"],
                           "label_map": {1: "liver", 2: "kidney", 3: "liver_tumor"}})[0]
    assert spec.classes == ["kidney_right", "liver"]
    keys = ["liver", "liver_tumor", "kidney_left", "kidney_right"]
    image, labels, annotated = preprocess_case(spec.cases[0], spec, keys, Preprocessing(spacing=[3.0] * 3))
    assert annotated.tolist() == [True, False, False, True] and image.shape == (10, 8, 8)
    assert not labels[1].any() and not labels[2].any()
    # nearest resampling to 3 mm keeps volumes roughly (8 voxels of 1.5 mm per voxel of 3 mm)
    assert abs(labels[0].sum() * 8 - expected("liver", {"liver", "liver_tumor"}).sum()) < 0.35 * box("liver").sum()
    assert abs(labels[3].sum() * 8 - box("kidney_right").sum()) < 0.5 * box("kidney_right").sum()


def test_foreground_crop_keeps_labels_aligned(tmp_path):
    ct = phantom_ct()
    ct[:, :, :] = -1000
    ct[6:14, 4:12, 5:11] = 40  # a small body
    liver = np.zeros(SHAPE, np.uint8)
    liver[8:12, 6:9, 6:9] = 1
    write(tmp_path / "images" / "c.nii.gz", ct)
    write(tmp_path / "labels" / "c.nii.gz", liver)
    spec = load(tmp_path, {"format": "plain", "root": str(tmp_path), "label_map": {1: "liver"}})[0]
    image, labels, _ = preprocess_case(spec.cases[0], spec, ["liver"], Preprocessing(spacing=[SPACING] * 3))
    # Inference's crop rule (geometry.crop_box): the body box grown by 6 mm = 4 voxels of 1.5 mm each side,
    # within the image: x 6..13 -> 2..17, y 4..11 -> 0..15, z 5..10 -> 1..14.
    assert image.shape == (16, 16, 14)
    assert np.array_equal(np.argwhere(labels[0]).min(0), [8 - 2, 6 - 0, 6 - 1]) and labels[0].sum() == liver.sum()


# --- names, errors, the demo spec ----------------------------------------------------------------------

@pytest.mark.parametrize("name,key", [
    ("Left Kidney", "kidney_left"), ("kidney (R)", "kidney_right"), ("kidney_r", "kidney_right"),
    ("kidneys", "kidney"), ("postcava", "inferior_vena_cava"), ("prostate/uterus", "prostate_or_uterus"),
    ("Adrenal", "adrenal_gland"), ("gall bladder", "gallbladder"), ("head of femur left", "femur_head_left"),
    ("small bowel", "intestine"), ("bone", None), ("background", None),
])
def test_label_names(name, key):
    assert resolve_label_key(name) == key


def test_config_errors(tmp_path):
    write(tmp_path / "images" / "a.nii.gz", phantom_ct())
    write(tmp_path / "labels" / "a.nii.gz", label_map({"liver": 1}))
    base = {"format": "plain", "root": str(tmp_path), "label_map": {1: "liver"}}
    for bad, match in [({"format": "decathlon"}, "unknown format"),
                       ({"root": str(tmp_path / "nope")}, "does not exist"),
                       ({"label_map": {1: "unicorn"}}, "not a known class"),
                       ({"classes": ["spleen"]}, "not in its labels"), ({"split": {"val": ["zz"]}}, "unknown case")]:
        with pytest.raises(InputError, match=match):
            load(tmp_path, {**base, **bad})
    with pytest.raises(InputError, match="used twice"):
        load_dataset_specs([{"name": "x", **base}, {"name": "x", **base}], tmp_path)


@pytest.mark.parametrize("entry, message", [
    ({"name": "x", "labl_map": {1: "liver"}}, "dataset x: labl_map: unknown key (known: name, format, root, "),
    ({"name": "x", "split": {"val_fraction": 2}}, "dataset x: split: must be none, meta, {val: [ids]} or "
                                                  "{val_fraction: f, seed: n}, got {'val_fraction': 2}"),
    ({"name": "x", "classes": "liver"}, "dataset x: classes: must be a list of class names, got 'liver'"),
    ({"format": "plain"}, "dataset entry 1: name: missing (required)"),
    ("x", "dataset entry 1: must be a mapping, got 'x'"),
])
def test_dataset_entry_errors_name_the_field_in_one_line(tmp_path, entry, message):
    with pytest.raises(InputError) as info:
        load_dataset_specs([entry], tmp_path)
    assert str(info.value).startswith(message)


def test_demo_spec_files_and_classes(tmp_path):
    registry = default_registry()
    specs = load_dataset_file(demo_spec(tmp_path))
    assert [s.name for s in specs] == ["abdomen-organs", "abdomen-gi-vessels-bones", "angiogram", "chest-pa"]
    for spec in specs:
        for case in spec.cases:
            assert all(p.is_file() for p in case.files()), spec.name
        assert all(k in registry for k in spec.classes)
    sets = {s.name: set(s.classes) for s in specs}
    assert not sets["abdomen-organs"] & sets["abdomen-gi-vessels-bones"]  # disjoint subsets of scan A
    assert {"aorta", "vertebrae_T12"} <= sets["angiogram"] & sets["abdomen-gi-vessels-bones"]
    assert not any("lumen" in k for s in sets.values() for k in s)
    # label-map values are TotalSegmentator v2 ids: check each against the id list
    names = json.loads(shared("totalsegmentator_v2_label_names.json").read_text())
    for spec in specs[:2]:
        for value, key in spec.cases[0].labels[0].values.items():
            assert isinstance(spec.cases[0].labels[0], LabelMapSource)
            assert TOTALSEG_NAMES.get(names[str(value)], names[str(value)]) == key, (value, key)
