"""The bundled default model through the real `universalseg predict`, scored against the sample's labels.

The acceptance check of the training issue: Dice >= 0.85 for liver, spleen and both kidneys on the
bundled sample CT (scan A, which is training data: this guards the shipped weights and the whole
inference path, it is not a generalisation figure), and the model also segments classes that
sources other than the organ source annotated (the union no single source has).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import SimpleITK as sitk
from conftest import SAMPLE_DIR

from UniversalSegLib.continual.evaluate import dice
from UniversalSegLib.store import load_model

SAMPLE = SAMPLE_DIR / "ct_abdomen.nii.gz"
LABELS = SAMPLE_DIR / "ct_abdomen_labels_totalsegmentator_v2.nii.gz"
# TotalSegmentator v2 ids in the sample's label map (totalsegmentator_v2_label_names.json)
ORGANS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5}
OTHER_SOURCE = {"stomach": 6, "aorta": 52, "vertebrae_L3": 29}  # not annotated by the organ source
# left/right pairs through `split_pair`; the hip bones touch at the symphysis (one component)
PAIRS = {"hip_left": 77, "hip_right": 78, "femur_left": 75, "femur_right": 76,
         "gluteus_maximus_left": 80, "gluteus_maximus_right": 81}
# Not in the sample's field of view; the model once put the first in its IVC, the second on its left iliac vein
ABSENT = ["common_carotid_artery_left", "heart"]
PORTAL_VEIN = 64  # empty in every scan until v0.5.0: its head's logits lay at -18 to -47


@pytest.fixture(scope="module")
def prediction(tmp_path_factory):
    """Masks (by class key), the statistics and the sample's label map, from one CLI run on the sample."""
    out = tmp_path_factory.mktemp("default_model") / "out"
    classes = [*ORGANS, *OTHER_SOURCE, *PAIRS, *ABSENT, "portal_vein_and_splenic_vein"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    run = subprocess.run([sys.executable, "-m", "UniversalSegLib", "predict", str(SAMPLE), "-o", str(out),
                          "--device", "cpu", "--formats", "nifti,stats", "--classes", *classes],
                         capture_output=True, text=True, encoding="utf-8", env=env, timeout=900)
    assert run.returncode == 0, run.stderr
    masks = {k: sitk.GetArrayFromImage(sitk.ReadImage(str(out / "masks" / f"{k}.nii.gz"))) > 0 for k in classes}
    stats = json.loads((out / "statistics.json").read_text())
    return masks, stats, sitk.GetArrayFromImage(sitk.ReadImage(str(LABELS)))


def test_default_model_source_split_is_as_documented():
    # the organ classes and the "other source" classes come from different training sources
    prov = load_model().manifest.provenance  # `datasets` since v0.5.0 (the train command's), before `training_data`
    sources = {s["name"]: set(s["classes"]) for s in prov.get("datasets") or prov["training_data"]}
    assert set(ORGANS) <= sources["abdomen-organs"] and not set(OTHER_SOURCE) & sources["abdomen-organs"]
    assert set(OTHER_SOURCE) <= sources["abdomen-gi-vessels-bones"]


def test_default_model_reaches_dice_085_on_the_sample_organs(prediction):
    masks, _, labels = prediction
    scores = {k: dice(masks[k], labels == v) for k, v in ORGANS.items()}
    assert all(s >= 0.85 for s in scores.values()), scores


def test_default_model_segments_classes_of_the_other_source(prediction):
    masks, stats, labels = prediction
    scores = {k: dice(masks[k], labels == v) for k, v in OTHER_SOURCE.items()}
    assert all(s >= 0.7 for s in scores.values()), scores
    rows = {row["key"]: row for row in stats["classes"]}
    assert all(rows[k]["volume_ml"] > 0 for k in OTHER_SOURCE)


def test_default_model_keeps_both_sides_of_each_pair(prediction):
    """Until session 10 the touching hip bones all went to the right hip (left: 2 ml of 356)."""
    masks, _, labels = prediction
    scores = {k: dice(masks[k], labels == v) for k, v in PAIRS.items()}
    assert all(s >= 0.7 for s in scores.values()), scores


def test_default_model_marks_no_neck_artery_or_heart_in_the_abdomen(prediction):
    """The left common carotid artery came out wholly inside the IVC (6.8 ml at confidence 0.92,
    not flagged) and a "heart" on the left iliac vein (35-38 ml at 0.81) until `postprocess.disjoint`
    dropped a vessel lying inside a more probable one and an organ lying in a vessel."""
    masks, stats, labels = prediction
    rows = {row["key"]: row for row in stats["classes"]}
    assert not any(masks[k].any() for k in ABSENT), {k: rows[k]["volume_ml"] for k in ABSENT}


def test_default_model_finds_the_portal_vein(prediction):
    """v0.5.0 (stage 2p): 0.494 on the sample, one component (largest_component), confident."""
    masks, stats, labels = prediction
    assert dice(masks["portal_vein_and_splenic_vein"], labels == PORTAL_VEIN) >= 0.4
    row = {r["key"]: r for r in stats["classes"]}["portal_vein_and_splenic_vein"]
    assert row["volume_ml"] > 5 and row["mean_confidence"] >= 0.9
