"""What a leave-B-out model sees in scan B's aorta and T12: mean (and highest) probabilities, in model
space, of the aorta, T12, L1 and L2 inside B's aorta and T12, and how many voxels it calls spinal
cord (B does not label it). Session 9 found B's bright lumen read as L1/L2 vertebra.

    python training/default_model/experiments/loso/aorta_probability.py MODEL_DIR [MODEL_DIR ...]
(after `python training/default_model/prepare.py`, which builds the model-space bundle)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from UniversalSegLib.store import load_model

BUNDLE = Path(__file__).resolve().parents[2] / "build" / "bundle.npz"
SHOWN = ("aorta", "vertebrae_T12", "vertebrae_L1", "vertebrae_L2", "spinal_cord")


def probabilities(model_dir: str, image: np.ndarray) -> dict[str, np.ndarray]:
    """Sigmoid maps of `SHOWN` on a model-space image, by the model's own sliding windows."""
    loaded = load_model(model_dir)
    classes = [loaded.manifest.class_keys.index(k) for k in SHOWN]
    x = torch.from_numpy(image.astype(np.float32))[None, None]
    with torch.no_grad():
        logits = sliding_window_inference(x, tuple(loaded.manifest.preprocessing.patch_size), 4,
                                          lambda w: loaded.model(w, classes=classes), overlap=0.5, mode="gaussian")
    return dict(zip(SHOWN, torch.sigmoid(logits)[0].numpy()))


def main() -> None:
    data = np.load(BUNDLE)
    meta = json.loads(str(data["meta"]))
    index = [s["name"] for s in meta["sources"]].index("angiogram")
    source = meta["sources"][index]
    labels = data[f"labels_{index}"]
    aorta = labels[source["classes"].index("aorta")] > 0
    t12 = labels[source["classes"].index("vertebrae_T12")] > 0
    for model_dir in sys.argv[1:]:
        p = probabilities(model_dir, data[f"image_{source['scan']}"])
        print(json.dumps({"model": model_dir, "in_B_aorta": {
            "aorta_mean": round(float(p["aorta"][aorta].mean()), 3),
            "aorta_max": round(float(p["aorta"][aorta].max()), 2),
            "L1_mean": round(float(p["vertebrae_L1"][aorta].mean()), 3),
            "L2_mean": round(float(p["vertebrae_L2"][aorta].mean()), 3)},
            "in_B_T12": {"T12_mean": round(float(p["vertebrae_T12"][t12].mean()), 3)},
            "spinal_cord_voxels_over_0.5": int((p["spinal_cord"] > 0.5).sum())}))


if __name__ == "__main__":
    main()
