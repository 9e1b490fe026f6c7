"""Anatomical plausibility (inference/plausibility.py, issue 25) on the real scans' label maps and on
arms composed beside them (UniversalSegLib/evaluation/variants.py, geometry, not the training generator)."""

from __future__ import annotations

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SAMPLE_DIR, SHARED_DATA

from UniversalSegLib.evaluation import variants
from UniversalSegLib.inference import plausibility
from UniversalSegLib.inference.masks import BoxMask
from UniversalSegLib.inference.result import ClassResult, SegmentationResult
from UniversalSegLib.io.stats import LOW_CONFIDENCE, compute_statistics
from UniversalSegLib.registry import default_registry

REGISTRY = default_registry()
A_CT = SHARED_DATA / "ct-abdomen" / "ct.nii.gz"
A_LABELS = SAMPLE_DIR / "ct_abdomen_labels_totalsegmentator_v2.nii.gz"


def _registry_masks(labels: np.ndarray) -> dict[str, BoxMask]:
    """The registry classes present in a TotalSegmentator v2 label array, as masks."""
    ids = variants.label_ids()
    return {key: BoxMask.from_array(labels == ids[key]) for key in REGISTRY.keys
            if key in ids and (labels == ids[key]).any()}


def _check(masks: dict[str, BoxMask], image: sitk.Image, confidence: float = 0.97):
    classes = {k: REGISTRY[k] for k in masks}
    return plausibility.check(masks, dict.fromkeys(masks, confidence), classes, image)


@pytest.fixture(scope="module")
def scan_a():
    return sitk.ReadImage(str(A_CT)), sitk.ReadImage(str(A_LABELS))


def test_real_labels_of_a_pass_untouched(scan_a):
    image, labels = scan_a
    masks = _registry_masks(sitk.GetArrayFromImage(labels))
    assert len(masks) >= 35  # organs, vessels, bones, muscles of the abdomen and pelvis
    out = _check(masks, image)
    assert out.reasons == {}
    assert all(out.masks[k].count == masks[k].count for k in masks)
    assert all(out.confidence[k] == 0.97 for k in masks)


@pytest.mark.parametrize("scan", ["ct-thorax-aorta", "ct-chest-pa"])
def test_real_masks_of_b_and_c_pass_untouched(scan):
    image = sitk.ReadImage(str(SHARED_DATA / scan / "ct.nii.gz"))
    masks = {p.name.removesuffix(".nii.gz"): BoxMask.from_array(sitk.GetArrayFromImage(sitk.ReadImage(str(p))) > 0)
             for p in sorted((SHARED_DATA / scan / "masks").glob("*.nii.gz"))
             if p.name.removesuffix(".nii.gz") in REGISTRY}
    assert masks
    out = _check(masks, image)
    assert out.reasons == {}
    assert all(out.masks[k].count == masks[k].count for k in masks)


def _with_arms(scan_a, arms):
    image, labels = scan_a
    return variants.compose_arms(image, labels, arms, seed=1)


@pytest.mark.parametrize("arms", [
    [variants.Arm("low", 15.0), variants.Arm("high", 25.0, shift_mm=-15.0)],
    [variants.Arm("low", -3.0, shift_mm=20.0, z_from=0.3), variants.Arm("high", 0.0, radius_mm=50.0)],
], ids=["apart", "touching"])
def test_trunk_structure_in_an_arm_is_removed_and_the_real_one_kept(scan_a, arms):
    image, labels, arm = _with_arms(scan_a, arms)
    masks = _registry_masks(sitk.GetArrayFromImage(labels))
    real_aorta = masks["aorta"].array()
    # a confident "aorta" in the arm's muscle (the bundled model's failure), beside the real one
    z, y, x = (int(v) for v in np.argwhere(arm)[np.count_nonzero(arm) // 2])
    fake = np.zeros_like(real_aorta)
    fake[z - 5:z + 5, y - 3:y + 3, x - 3:x + 3] = arm[z - 5:z + 5, y - 3:y + 3, x - 3:x + 3]
    assert fake.sum() > 100
    masks["aorta"] = BoxMask.from_array(real_aorta | fake)
    out = _check(masks, image)
    assert np.array_equal(out.masks["aorta"].array(), real_aorta)
    assert "outside the trunk" in out.reasons["aorta"]
    assert set(out.reasons) == {"aorta"}  # every real structure beside the arms is kept as it is
    assert all(out.masks[k].count == masks[k].count for k in masks if k != "aorta")


def test_a_mask_wholly_in_an_arm_is_emptied_with_its_reason(scan_a):
    image, labels, arm = _with_arms(scan_a, [variants.Arm("high", 10.0)])
    out = _check({"spleen": BoxMask.from_array(arm)}, image)
    assert not out.masks["spleen"] and out.confidence["spleen"] == 0.0
    assert "removed" in out.reasons["spleen"]


def test_implausible_position_lowers_confidence_and_is_flagged(scan_a):
    image, labels = scan_a
    masks = _registry_masks(sitk.GetArrayFromImage(labels))
    swapped = {"kidney_right": masks["kidney_left"], "vertebrae_L1": masks["vertebrae_L4"],
               "vertebrae_L4": masks["vertebrae_L1"], "vertebrae_T12": masks["vertebrae_T12"]}
    out = _check(swapped, image)
    assert "left of the midline" in out.reasons["kidney_right"]
    assert "lies above vertebrae_L1" in out.reasons["vertebrae_L4"]  # swapped: both are suspect
    assert "lies below vertebrae_L4" in out.reasons["vertebrae_L1"]
    assert "vertebrae_T12" not in out.reasons  # in its place above both
    for key in ("kidney_right", "vertebrae_L4", "vertebrae_L1"):
        assert out.confidence[key] < LOW_CONFIDENCE
        assert out.masks[key].count == swapped[key].count  # flagged, not removed
    result = SegmentationResult(image, [ClassResult(REGISTRY[k], out.masks[k], out.confidence[k],
                                                    reason=out.reasons.get(k, "")) for k in swapped], "test")
    rows = {r["key"]: r for r in compute_statistics(result)}
    assert rows["kidney_right"]["low_confidence"] and "midline" in rows["kidney_right"]["reason"]
    assert rows["vertebrae_T12"]["reason"] == ""


def test_midline_from_bone_matches_the_spine_masks(scan_a):
    image, labels = scan_a
    masks = _registry_masks(sitk.GetArrayFromImage(labels))
    with_spine = plausibility.body_frame(image, plausibility.spine_mask(masks))
    from_bone = plausibility.body_frame(image, None)
    both = ~np.isnan(with_spine.midline) & ~np.isnan(from_bone.midline)
    assert both.sum() > 50
    assert np.median(np.abs(with_spine.midline[both] - from_bone.midline[both])) * image.GetSpacing()[0] < 6.0


def test_array_order_does_not_matter(scan_a):
    """A sagittal-first array order (same physical image): the same verdicts."""
    image, labels, arm = _with_arms(scan_a, [variants.Arm("low", 5.0)])
    masks = _registry_masks(sitk.GetArrayFromImage(labels))
    masks["liver"] = BoxMask.from_array(masks["liver"].array() | arm)
    order = [2, 0, 1]  # image index axes (x, y, z) -> (z, x, y)
    permuted = sitk.PermuteAxes(image, order)
    moved = {k: BoxMask.from_array(np.transpose(m.array(), [2 - order[2 - a] for a in range(3)]))
             for k, m in masks.items()}
    straight, turned = _check(masks, image), _check(moved, permuted)
    assert set(straight.reasons) == set(turned.reasons) == {"liver"}
    assert straight.masks["liver"].count == turned.masks["liver"].count


def test_end_to_end_no_unflagged_trunk_structure_in_an_arm():
    """The bundled model on a 30-slice slab of A with arms composed beside it (`predict`'s default)."""
    from UniversalSegLib import predict

    image = sitk.ReadImage(str(SHARED_DATA / "ct-abdomen" / "ct_small.nii.gz"))
    composed, _, arm = variants.compose_arms(image, None, [variants.Arm("low", 0.0), variants.Arm("high", 10.0)])
    result = predict(composed, device="cpu")
    assert result.metadata["plausibility_checked"]
    for c in result.classes:
        labels, n = cc3d.connected_components(c.mask, connectivity=26, return_N=True)
        flagged = c.mean_confidence < LOW_CONFIDENCE or bool(c.reason)
        for i in range(1, n + 1):
            component = labels == i
            in_arm = np.count_nonzero(component & arm)
            assert in_arm * 2 < np.count_nonzero(component) or flagged, (c.info.key, in_arm, c.mean_confidence)
