"""Field-of-view and sampling variants of a CT (UniversalSegLib/evaluation/variants.py): the slabs,
padded planes and resampled copies issue 8's cross-scan checks score a model on keep the anatomy
where it was, so Dice against the variant's labels measures the model."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from UniversalSegLib.evaluation.variants import (
    PV_TARGET_HU,
    centred_slab,
    mid_slice,
    pad_plane,
    reenhance,
    resample,
    slab,
)


def _image(shape=(20, 16, 12), spacing=(2.0, 1.5, 3.0), origin=(-10.0, 5.0, 30.0)):
    array = np.arange(np.prod(shape), dtype=np.int16).reshape(shape[::-1]) % 300
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def test_slab_keeps_geometry_of_the_chosen_slices():
    image = _image()
    part = slab(image, 4, 5)
    assert part.GetSize() == (20, 16, 5)
    assert part.GetOrigin() == pytest.approx(image.TransformIndexToPhysicalPoint((0, 0, 4)))
    assert np.array_equal(sitk.GetArrayFromImage(part), sitk.GetArrayFromImage(image)[4:9])


def test_slabs_centre_on_an_organ_and_stay_inside_the_scan():
    array = np.zeros((12, 16, 20), np.int16)  # 20 x 16 x 12 voxels
    array[2:5, 3:6, 4:8] = 5
    array[8:12, 3:6, 4:8] = 3
    labels = sitk.GetImageFromArray(array)
    assert mid_slice(labels, [5]) == 3
    assert mid_slice(labels, [3, 2]) == 10
    image, truth = centred_slab(labels, labels, 3, 5)  # slices 1..5
    assert image.GetSize()[2] == 5 and sitk.GetArrayFromImage(truth)[1:4].max() == 5
    _, edge = centred_slab(labels, labels, 10, 5)  # would reach slice 12: shifted back to 7..11
    assert edge.GetOrigin()[2] == pytest.approx(7.0)


def test_padding_reaches_the_field_of_view_and_keeps_the_anatomy_in_place():
    image = _image()
    padded = pad_plane(image, 100.0, -1024.0)
    size, spacing = padded.GetSize(), padded.GetSpacing()
    assert abs(size[0] * spacing[0] - 100.0) <= 2 * spacing[0] and abs(size[1] * spacing[1] - 100.0) <= 2 * spacing[1]
    assert size[2] == image.GetSize()[2]
    index = padded.TransformPhysicalPointToIndex(image.TransformIndexToPhysicalPoint((3, 7, 2)))
    assert padded[index] == image[3, 7, 2] and padded[0, 0, 0] == -1024


def test_resampled_copy_covers_the_same_extent():
    image = _image()
    fine = resample(image, (1.0, 1.0, 6.0), sitk.sitkNearestNeighbor, 0)
    assert fine.GetSize() == (40, 24, 6)
    assert fine.GetOrigin() == image.GetOrigin()
    assert fine[4, 6, 1] == image[2, 4, 2]


def test_reenhance_moves_a_bright_lumen_to_its_portal_venous_median_and_keeps_its_texture():
    """Scan B's arteries (arterial phase) lowered to portal-venous values from per-class masks: the
    lumen's median reaches its target, its voxels keep their spread, far-away tissue is untouched."""
    shape = (24, 24, 24)
    rng = np.random.default_rng(0)
    hu = rng.normal(40.0, 10.0, shape).astype(np.float32)  # soft tissue
    z, y, x = np.indices(shape)
    lumen = (y - 12) ** 2 + (x - 12) ** 2 <= 16  # a tube along z
    hu[lumen] = rng.normal(450.0, 60.0, int(lumen.sum()))  # arterial-phase aorta, a true/false-lumen spread
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.5, 1.5, 1.5))
    out = sitk.GetArrayFromImage(reenhance(image, {"aorta": lumen, "not_a_vessel": ~lumen}))
    assert np.median(out[lumen]) == pytest.approx(PV_TARGET_HU["aorta"], abs=15)
    assert np.std(out[lumen]) == pytest.approx(np.std(hu[lumen]), rel=0.1)
    far = np.hypot(y - 12, x - 12) > 8
    assert np.allclose(out[far], hu[far], atol=0.5)  # unnamed regions and tissue beyond the blend keep their HU
