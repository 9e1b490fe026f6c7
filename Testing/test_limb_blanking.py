"""Arms beside the trunk blanked to air in the model's input (plausibility.blank_limbs, predict's
preprocessing; issue 25): a no-op on a real scan without arms, the arm's voxels air and no
labelled voxel touched on a real crop of scan A with an arm drawn beside it (Testing/arm_drawing.py)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from arm_drawing import with_arm
from conftest import SHARED_DATA

from UniversalSegLib.evaluation import variants
from UniversalSegLib.inference import plausibility, predict
from UniversalSegLib.registry import ClassInfo, default_registry

A_SMALL = SHARED_DATA / "ct-abdomen" / "ct_small.nii.gz"  # 30 slices of scan A
A_SMALL_LABELS = SHARED_DATA / "ct-abdomen" / "ct_small_labels_totalsegmentator_v2.nii.gz"
TRUNK_CLASSES = list(default_registry())


@pytest.fixture(scope="module")
def crop_of_a():
    return sitk.ReadImage(str(A_SMALL)), sitk.GetArrayFromImage(sitk.ReadImage(str(A_SMALL_LABELS)))


def test_no_op_on_a_real_scan_without_arms(crop_of_a):
    image, _ = crop_of_a
    assert not plausibility.limbs_to_blank(image).any()
    seen, ml = plausibility.blank_limbs(image, TRUNK_CLASSES)
    assert seen is image and ml == 0.0


class _Stop(Exception):
    """Raised by the captured preprocess: the model need not run to see its input."""


def _model_input(monkeypatch, image: sitk.Image, **kwargs) -> sitk.Image:
    """The image that `predict` hands to preprocessing (the model's input before resampling)."""
    seen = {}

    def capture(img, pre):
        seen["image"] = img
        raise _Stop

    monkeypatch.setattr(predict, "preprocess", capture)
    with pytest.raises(_Stop):
        predict.predict(image, device="cpu", **kwargs)
    return seen["image"]


@pytest.mark.parametrize(("side", "gap_mm"), [("low", 15.0), ("high", 0.0)], ids=["apart", "touching"])
def test_arm_is_air_in_the_model_input_and_no_labelled_voxel_blanked(monkeypatch, crop_of_a, side, gap_mm):
    image, labels = crop_of_a
    composed, arm, offset = with_arm(image, side, gap_mm)
    seen = sitk.GetArrayFromImage(_model_input(monkeypatch, composed))
    original = sitk.GetArrayFromImage(composed)
    blanked = seen != original
    assert (seen[blanked] == plausibility.BLANK_HU).all()
    assert blanked[arm].all()  # touching too: blanked up to the contact
    in_scan = np.zeros(seen.shape, dtype=bool)
    in_scan[:, :, offset:offset + image.GetSize()[0]] = True
    blanked_in_scan = blanked[in_scan].reshape(labels.shape)
    assert not (blanked_in_scan & (sitk.GetArrayFromImage(image) > -500)).any()  # not a voxel of the trunk's body
    assert not (blanked_in_scan & (labels > 0)).any()  # nor of a labelled structure
    assert not (seen[~in_scan] > -500).any()  # nothing of the arm left: the body crop is the trunk's


def test_not_blanked_without_the_check_or_for_a_class_that_may_lie_in_a_limb(monkeypatch, crop_of_a):
    image, _ = crop_of_a
    composed, _, _ = with_arm(image, "low", 15.0)
    assert _model_input(monkeypatch, composed, plausibility=False) is composed
    humerus = ClassInfo("humerus_left", "Left humerus", "bone", location={"trunk": False})
    assert plausibility.blank_limbs(composed, [*TRUNK_CLASSES, humerus])[0] is composed
    seen, ml = plausibility.blank_limbs(composed, TRUNK_CLASSES)
    assert seen is not composed and ml > 100.0  # an upper arm over 30 slices of 3 mm


def _predict_counting_the_finder(monkeypatch, image: sitk.Image, share: bool):
    """`predict` of a few classes on `image`, and how many axial slices the limb finder looked at.
    `share=False`: every use finds its own `Trunk` (the blanking and both plausibility rules), as
    before the finder's result was shared."""
    calls = []
    body_slice = plausibility._body_slice
    monkeypatch.setattr(plausibility, "_body_slice", lambda hu: calls.append(1) or body_slice(hu))
    if not share:
        monkeypatch.setattr(plausibility, "_trunk_of", lambda reference, trunk: plausibility.Trunk(reference))
    result = predict.predict(image, device="cpu", classes=["aorta", "spleen", "vertebrae_L1", "vertebrae_L4"],
                             include_helper_classes=True)
    monkeypatch.undo()
    return result, len(calls)


def test_limb_finder_runs_once_per_predict_with_the_same_results(monkeypatch, crop_of_a):
    """Arms composed beside a crop of A: the finder's result serves the blanking and the checks
    (one look per slice, not three), and masks, confidences and reasons are those found unshared."""
    image, labels = crop_of_a
    composed = variants.compose_arms(image, None, [variants.Arm("low", 0.0), variants.Arm("high", 10.0)])[0]
    shared, looks = _predict_counting_the_finder(monkeypatch, composed, share=True)
    unshared, unshared_looks = _predict_counting_the_finder(monkeypatch, composed, share=False)
    slices = composed.GetSize()[2]
    assert shared.metadata["limbs_blanked_ml"] > 100.0  # the arms were found and blanked
    assert (looks, unshared_looks) == (slices, 3 * slices)
    assert shared.metadata["limbs_blanked_ml"] == unshared.metadata["limbs_blanked_ml"]
    for a, b in zip(shared.classes, unshared.classes, strict=True):
        assert a.info.key == b.info.key
        assert np.array_equal(a.mask, b.mask), a.info.key
        assert (a.mean_confidence, a.reason) == (b.mean_confidence, b.reason), a.info.key


def test_a_trunk_found_on_another_image_is_refused(crop_of_a):
    image, _ = crop_of_a
    other = sitk.Image(image)
    with pytest.raises(ValueError, match="another image"):
        plausibility.limbs_to_blank(image, plausibility.Trunk(other))
