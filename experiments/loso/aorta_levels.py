"""Issue 8's leave-one-scan-out structures by vertebral level: how much of each held-out aorta lies
at levels the other scan labels, and (given models) the Dice there and elsewhere.

Scan A's labels stop at T12 (the abdomen, up to the T11/T12 disc); scan B's start inside T12 (the
thorax, down to T12). The two scans share only T12's level. A model that finds the aorta exactly
where it has seen it labelled, and nowhere else, scores at most the "bound" printed here:
2v / (v + V) for the held-out aorta's volume V and its part v at shared levels.

    python -m experiments.loso.aorta_levels                 # bounds only (from the repo root)
    python -m experiments.loso.aorta_levels --noB MODEL --noA MODEL [--json F]

Runs in model space on `build/bundle.npz` (python training/default_model/prepare.py), like
evaluate.py, whose sliding-window prediction it shares.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from experiments.model_space_dice import dice, predict_masks  # the recipe's model-space evaluation
from experiments.paths import BUNDLE, RECIPE
from UniversalSegLib.store import load_model

# direction -> (held-out source, where the shared level is: at/below or at/above T12)
HELD_OUT = {"noB": ("angiogram", "below"), "noA": ("abdomen-gi-vessels-bones", "above")}


def shared_levels(t12: np.ndarray, side: str) -> slice:
    """Axial slices (last axis, inferior to superior) at T12's level and on the other scan's side."""
    z = np.nonzero(t12.any(axis=(0, 1)))[0]
    return slice(0, z.max() + 1) if side == "below" else slice(z.min(), None)


def source_labels(data, meta: dict, name: str) -> tuple[int, dict[str, np.ndarray]]:
    i, src = next((i, s) for i, s in enumerate(meta["sources"]) if s["name"] == name)
    labels = data[f"labels_{i}"]
    return src["scan"], {k: labels[j] > 0 for j, k in enumerate(src["classes"])}


def level_scores(pred: dict[str, np.ndarray] | None, truth: dict[str, np.ndarray], side: str,
                 voxel_ml: float) -> dict:
    """Volumes, the bound, and (with a prediction) Dice of the aorta at and away from shared levels."""
    aorta, levels = truth["aorta"], shared_levels(truth["vertebrae_T12"], side)
    shared = np.zeros_like(aorta)
    shared[..., levels] = True
    v, total = int((aorta & shared).sum()), int(aorta.sum())
    out = {"aorta_ml": round(total * voxel_ml, 1), "aorta_ml_at_shared_levels": round(v * voxel_ml, 1),
           "dice_bound_shared_levels_only": round(2 * v / (v + total), 3)}
    if pred is not None:
        out.update({
            "aorta": round(dice(pred["aorta"], aorta), 3),
            "aorta_at_shared_levels": round(dice(pred["aorta"] & shared, aorta & shared), 3),
            "aorta_elsewhere": round(dice(pred["aorta"] & ~shared, aorta & ~shared), 3),
            "aorta_predicted_ml": round(float(pred["aorta"].sum()) * voxel_ml, 1),
            "vertebrae_T12": round(dice(pred["vertebrae_T12"], truth["vertebrae_T12"]), 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for direction in HELD_OUT:
        ap.add_argument(f"--{direction}", metavar="MODEL_DIR", help=f"a model trained in direction {direction}")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    data = np.load(BUNDLE)
    meta = json.loads(str(data["meta"]))
    voxel_ml = float(np.prod(yaml.safe_load(RECIPE.read_text())["preprocessing"]["spacing"])) / 1000  # model space
    report = {}
    for direction, (name, side) in HELD_OUT.items():
        scan, truth = source_labels(data, meta, name)
        model_dir = getattr(args, direction)
        pred = None
        if model_dir:
            loaded = load_model(model_dir)
            masks, keys = predict_masks(loaded, data[f"image_{scan}"]), loaded.manifest.class_keys
            pred = {k: masks[keys.index(k)] for k in ("aorta", "vertebrae_T12")}
        report[f"{direction}: {name}"] = level_scores(pred, truth, side, voxel_ml)
        print(direction, name, report[f"{direction}: {name}"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
