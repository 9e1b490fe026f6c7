"""Scan B's arteries moved to portal-venous values the way training's phase change sees them: B clipped
to the model's HU window first, then each labelled artery's mean moved inside its mask (no outward
feathering), against `variants.reenhance` on B's real HU. Dice of B's labelled classes for each.

    python -m experiments.contrast_phases_2g.clip_then_shift [--model DIR]      # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import SimpleITK as sitk

from experiments.measure_variants import SCANS, truths_of
from experiments.paths import SHARED_DATA
from UniversalSegLib.continual.evaluate import dice
from UniversalSegLib.evaluation.variants import PV_TARGET_HU, reenhance
from UniversalSegLib.inference.predict import predict

HU_WINDOW = (-175.0, 250.0)  # the bundled model's preprocessing.hu_window
B_CLASSES = ("aorta", "celiac_trunk", "superior_mesenteric_artery", "subclavian_artery_left",
             "common_carotid_artery_left", "brachiocephalic_trunk", "vertebrae_T12")  # recipe's angiogram


def clip_then_shift(image: sitk.Image, masks: dict[str, np.ndarray]) -> sitk.Image:
    """What `ContrastPhaseAugment` does to B in the training cache's clipped window, in HU."""
    hu = np.clip(sitk.GetArrayFromImage(image).astype(np.float32), *HU_WINDOW)
    for key, region in masks.items():
        hu[region] += PV_TARGET_HU[key] - hu[region].mean()
    out = sitk.GetImageFromArray(hu)
    out.CopyInformation(image)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder or name (default: the bundled model)")
    args = parser.parse_args()
    scan = sitk.ReadImage(str(SHARED_DATA / SCANS["B"]))
    truth = {k: v for k, v in truths_of("B").items() if k in B_CLASSES}  # not the lumens (extension demo)
    arteries = {k: v for k, v in truth.items() if k in PV_TARGET_HU}
    figures = {}
    for name, image in (("B", scan), ("reenhance", reenhance(scan, arteries)),
                        ("clip_then_shift", clip_then_shift(scan, arteries))):
        result = predict(image, model=args.model, classes=list(truth), subset_windows=False)
        figures[name] = {k: round(float(dice(result[k].mask, truth[k]) or 0.0), 3) for k in truth}
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
