"""What a leave-B-out model sees in scan B's aorta and T12: mean (and highest) probabilities, in model
space, of the aorta, T12, L1 and L2 inside B's aorta and T12, and how many voxels it calls spinal
cord (B does not label it). Session 9 found B's bright lumen read as L1/L2 vertebra.

    python -m experiments.loso.aorta_probability MODEL_DIR [MODEL_DIR ...]      # from the repo root
(after `python training/default_model/prepare.py`, which builds the model-space bundle)
"""

from __future__ import annotations

import json
import sys

import numpy as np

from experiments.loso.aorta_levels import source_labels
from experiments.model_space_dice import predict_probabilities  # the recipe's model-space evaluation
from experiments.paths import BUNDLE
from UniversalSegLib.store import load_model

SHOWN = ("aorta", "vertebrae_T12", "vertebrae_L1", "vertebrae_L2", "spinal_cord")


def main() -> None:
    data = np.load(BUNDLE)
    scan, truth = source_labels(data, json.loads(str(data["meta"])), "angiogram")
    aorta, t12 = truth["aorta"], truth["vertebrae_T12"]
    for model_dir in sys.argv[1:]:
        loaded = load_model(model_dir)
        maps = predict_probabilities(loaded, data[f"image_{scan}"],
                                     classes=[loaded.manifest.class_keys.index(k) for k in SHOWN])
        p = dict(zip(SHOWN, maps))
        print(json.dumps({"model": model_dir, "in_B_aorta": {
            "aorta_mean": round(float(p["aorta"][aorta].mean()), 3),
            "aorta_max": round(float(p["aorta"][aorta].max()), 2),
            "L1_mean": round(float(p["vertebrae_L1"][aorta].mean()), 3),
            "L2_mean": round(float(p["vertebrae_L2"][aorta].mean()), 3)},
            "in_B_T12": {"T12_mean": round(float(p["vertebrae_T12"][t12].mean()), 3)},
            "spinal_cord_voxels_over_0.5": int((p["spinal_cord"] > 0.5).sum())}))


if __name__ == "__main__":
    main()
