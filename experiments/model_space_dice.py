"""Dice of a model on the prepared scans, in model space, for every labelled class of every source.

Reads the retired recipe scripts' `build/bundle.npz` (experiments/README.md, "Running": *bundle*).

Used for the leave-one-scan-out checks (train with --drop, evaluate the dropped labels here):
    python -m experiments.model_space_dice MODEL_DIR [--json out.json]
With --holdout-top F (a model trained with the same flag) it scores the held-out top fraction of
every scan and, for comparison, the trained slices below it.
The windows and their stitching are `predict`'s (`train.validation.predict_case`); on the input
grid, with restoration and the post-processing rules, `train.validation.validate_images` scores
exactly what `predict` gives users.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from experiments.paths import BUNDLE
from UniversalSegLib.store import load_model
from UniversalSegLib.train.validation import predict_case


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum()))


def predict_probabilities(loaded, image: np.ndarray, window: int | None = None,
                          classes: list[int] | None = None) -> np.ndarray:
    """Sigmoid maps (classes, X, Y, Z) of a model-space image by `predict`'s sliding window and stitching;
    `loaded`: `load_model`'s; `classes`: model indices to run (default: all)."""
    pre = loaded.manifest.preprocessing
    size = (window,) * 3 if window else tuple(pre.patch_size)
    indices = list(range(len(loaded.manifest.class_keys))) if classes is None else classes
    x = torch.from_numpy(image.astype(np.float32))[None]
    return predict_case(loaded.model, x, indices, size, torch.device("cpu"), overlap=pre.overlap,
                        sw_batch_size=4).numpy()


def predict_masks(loaded, image: np.ndarray, window: int | None = None) -> np.ndarray:
    """Masks (classes, X, Y, Z) of a model-space image by sliding windows; `loaded`: `load_model`'s."""
    return predict_probabilities(loaded, image, window) > 0.5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--json", default=None)
    ap.add_argument("--holdout-top", type=float, default=0.0,
                    help="score the held-out top fraction (and the trained rest) separately")
    ap.add_argument("--window", type=int, default=None,
                    help="sliding-window edge in voxels (default: the model's patch size)")
    args = ap.parse_args()
    loaded = load_model(args.model)
    keys = loaded.manifest.class_keys
    data = np.load(BUNDLE)
    meta = json.loads(str(data["meta"]))
    results, masks = {}, {}
    for i, src in enumerate(meta["sources"]):
        scan = src["scan"]
        if scan not in masks:  # once per scan (A has 2 sources)
            masks[scan] = predict_masks(loaded, data[f"image_{scan}"], args.window)
        labels = data[f"labels_{i}"]
        if args.holdout_top:  # the held-out top slices, and for comparison the trained slices below them
            first = int(round(labels.shape[3] * (1 - args.holdout_top)))
            parts = {"held_out": slice(first, None), "trained": slice(0, first)}
        else:
            parts = {"all": slice(None)}
        pred = masks[scan]
        for part, z in parts.items():
            scores = {k: round(dice(pred[keys.index(k)][..., z], labels[j][..., z] > 0), 3)
                      for j, k in enumerate(src["classes"]) if labels[j][..., z].any()}
            if args.holdout_top:
                results.setdefault(part, {})[src["name"]] = scores
            else:
                results[src["name"]] = scores
            print(src["name"], part, scores)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
