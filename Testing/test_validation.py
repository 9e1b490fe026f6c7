"""Validation on the shipped path (train/validation.py): the Dice it reports is the Dice of what `predict` gives."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import shared

from UniversalSegLib.inference.predict import load_for_inference, predict
from UniversalSegLib.inference.preprocess import preprocess
from UniversalSegLib.inference.restore import to_input_grid
from UniversalSegLib.train.validation import predict_case, validate_images

TOTALSEG_V2 = {"spleen": 1, "liver": 5}


@pytest.fixture(scope="module")
def crop():
    """14 axial slices (3 mm) of the real abdomen CT through liver and spleen, and their labels (z, y, x)."""
    image = sitk.ReadImage(str(shared("ct-abdomen", "ct_small.nii.gz")))[:, :, 12:26]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(
        str(shared("ct-abdomen", "ct_small_labels_totalsegmentator_v2.nii.gz"))))[12:26]
    return image, {key: labels == value for key, value in TOTALSEG_V2.items()}


@pytest.fixture(scope="module")
def loaded():
    return load_for_inference(None, "cpu")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def test_validation_dice_is_the_dice_of_predicts_masks(crop, loaded):
    image, labels = crop
    assert all(m.any() for m in labels.values())
    scores = validate_images(loaded, [{"image": image, "labels": labels, "dataset": "A", "case": "crop"}])
    result = predict(image, model=loaded, classes=list(labels), device="cpu")
    expected = {k: _dice(result[k].mask, labels[k]) for k in labels}
    assert {s.class_key: s.dice for s in scores} == pytest.approx(expected, abs=1e-6)
    assert min(expected.values()) > 0.5  # a real segmentation, not two empty masks


def test_model_space_validation_stitches_as_predict(crop, loaded):
    # validation on a preprocessed case, restored to the input grid, gives predict's mask (rules off;
    # the full grid's windows, as for all classes: a one-class request otherwise runs ROI windows)
    image, _ = crop
    pre = loaded.manifest.preprocessing
    prepared = preprocess(image, pre)
    liver = loaded.manifest.class_keys.index("liver")
    probs = predict_case(loaded.model, torch.from_numpy(prepared.volume)[None], [liver], pre.patch_size,
                         torch.device("cpu"), overlap=pre.overlap)
    restored = to_input_grid(probs[0].numpy(), prepared.grid, image, pre.threshold)
    shipped = predict(image, model=loaded, classes=["liver"], device="cpu", postprocess=False,
                      subset_windows=False)["liver"].mask
    assert restored.mask.count > 1000
    assert np.array_equal(restored.mask.array(), shipped)
