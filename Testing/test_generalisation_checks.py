"""The cross-scan checks of issue 8 (training/default_model/check_generalisation.py) and the LOSO aorta
bound (experiments/loso/aorta_levels.py): moved out of test_default_recipe.py by issue 26a unchanged;
these scripts (and this file's sys.path import) leave the product tree with issue 26b."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

RECIPE_DIR = Path(__file__).resolve().parents[1] / "training" / "default_model"
sys.path.insert(0, str(RECIPE_DIR))
import check_generalisation as checks  # noqa: E402


def _image(shape=(20, 16, 12), spacing=(2.0, 1.5, 3.0), origin=(-10.0, 5.0, 30.0)):
    array = np.arange(np.prod(shape), dtype=np.int16).reshape(shape[::-1]) % 300
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def test_slab_keeps_geometry_of_the_chosen_slices():
    image = _image()
    part = checks.slab(image, 4, 5)
    assert part.GetSize() == (20, 16, 5)
    assert part.GetOrigin() == pytest.approx(image.TransformIndexToPhysicalPoint((0, 0, 4)))
    assert np.array_equal(sitk.GetArrayFromImage(part), sitk.GetArrayFromImage(image)[4:9])


def test_slabs_centre_on_an_organ_and_stay_inside_the_scan():
    labels = sitk.GetImageFromArray(np.zeros((12, 16, 20), np.int16))  # 20 x 16 x 12 voxels
    array = sitk.GetArrayFromImage(labels)
    array[2:5, 3:6, 4:8] = checks.ORGANS["liver"]
    array[8:12, 3:6, 4:8] = checks.ORGANS["kidney_left"]
    labels = sitk.GetImageFromArray(array)
    assert checks.mid_slice(labels, ["liver"]) == 3
    assert checks.kidney_mid_slice(labels) == 10
    image, truth = checks.centred_slab(labels, labels, 3, 5)  # slices 1..5
    assert image.GetSize()[2] == 5 and sitk.GetArrayFromImage(truth)[1:4].max() == checks.ORGANS["liver"]
    _, edge = checks.centred_slab(labels, labels, 10, 5)  # would reach slice 12: shifted back to 7..11
    assert edge.GetOrigin()[2] == pytest.approx(7.0)


def test_padding_reaches_the_field_of_view_and_keeps_the_anatomy_in_place():
    image = _image()
    padded = checks.pad_plane(image, 100.0, -1024.0)
    size, spacing = padded.GetSize(), padded.GetSpacing()
    assert abs(size[0] * spacing[0] - 100.0) <= 2 * spacing[0] and abs(size[1] * spacing[1] - 100.0) <= 2 * spacing[1]
    assert size[2] == image.GetSize()[2]
    index = padded.TransformPhysicalPointToIndex(image.TransformIndexToPhysicalPoint((3, 7, 2)))
    assert padded[index] == image[3, 7, 2] and padded[0, 0, 0] == -1024


def test_resampled_copy_covers_the_same_extent():
    image = _image()
    fine = checks.resample(image, (1.0, 1.0, 6.0), sitk.sitkNearestNeighbor, 0)
    assert fine.GetSize() == (40, 24, 6)
    assert fine.GetOrigin() == image.GetOrigin()
    assert fine[4, 6, 1] == image[2, 4, 2]


def test_chest_above_check_keeps_the_labels_on_the_abdomen_and_none_in_the_chest():
    ct = sitk.GetImageFromArray(np.full((6, 10, 12), 40, np.int16))  # z, y, x: 12 x 10 x 6 voxels, 3 mm
    labels_array = np.zeros((6, 10, 12), np.uint8)
    labels_array[:, 4:6, 5:7] = 52  # the aorta the crop centres on
    labels_array[1:3, 2:4, 2:5] = checks.ORGANS["liver"]
    chest = sitk.GetImageFromArray(np.full((40, 8, 8), 300, np.int16))  # 1.5 mm grid: 4 x 4 x 20 at 3 mm
    for image in (ct, chest):
        image.SetSpacing((3.0, 3.0, 3.0) if image is ct else (1.5, 1.5, 1.5))
    labels = sitk.GetImageFromArray(labels_array)
    labels.CopyInformation(ct)
    variants = checks.chest_above(ct, labels, chest, start_mm=6.0, height_mm=30.0)
    (ref_image, ref_labels), (image, truth) = variants.values()
    assert list(variants) == ["plane_of_chest", "chest_above_30mm"]
    assert ref_image.GetSize() == (4, 4, 6) and image.GetSize() == (4, 4, 16)
    array, truth_array = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(truth)
    assert (array[:6] == 40).all() and (array[6:] == 300).all()
    assert not truth_array[6:].any() and (truth_array[:6] == sitk.GetArrayFromImage(ref_labels)).all()
    assert (truth_array == 52).any()  # the crop kept A's aorta in its plane


@pytest.mark.parametrize("side", ["below", "above"])
def test_aorta_levels_bound_is_the_dice_of_finding_the_aorta_at_shared_levels_only(side, monkeypatch):
    """Issue 8's LOSO bound: a prediction exactly right at T12's level (and on the other scan's side
    of it) and empty elsewhere scores the bound, and the shared-level Dice is then 1."""
    sys.path.insert(0, str(RECIPE_DIR / "experiments" / "loso"))
    # aorta_levels imports prepare.py (gone with issue 26a) only to read the recipe's spacing
    from types import ModuleType

    from UniversalSegLib.config_file import read_config_file

    prepare = ModuleType("prepare")
    prepare.load_recipe = lambda: read_config_file(RECIPE_DIR / "recipe.yaml")
    monkeypatch.setitem(sys.modules, "prepare", prepare)
    monkeypatch.delitem(sys.modules, "aorta_levels", raising=False)
    import aorta_levels as levels
    aorta = np.zeros((8, 8, 40), bool)
    aorta[3:5, 3:5, :] = True
    t12 = np.zeros_like(aorta)
    t12[1:3, 1:3, 10:20] = True
    shared = slice(0, 20) if side == "below" else slice(10, None)
    assert levels.shared_levels(t12, side) == shared
    pred = {"aorta": np.zeros_like(aorta), "vertebrae_T12": t12.copy()}
    pred["aorta"][..., shared] = aorta[..., shared]
    scores = levels.level_scores(pred, {"aorta": aorta, "vertebrae_T12": t12}, side, 1.0)
    v = 4 * (20 if side == "below" else 30)
    assert scores["aorta_ml_at_shared_levels"] == v and scores["aorta_ml"] == 160
    assert scores["dice_bound_shared_levels_only"] == round(2 * v / (v + 160), 3) == scores["aorta"]
    assert scores["aorta_at_shared_levels"] == 1.0 and scores["aorta_elsewhere"] == 0.0
    assert scores["vertebrae_T12"] == 1.0
