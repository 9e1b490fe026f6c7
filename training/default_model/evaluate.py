"""Dice of a model on the prepared scans, in model space, for every labelled class of every source.

Used for the leave-one-scan-out checks (train with --drop, evaluate the dropped labels here):
    python training/default_model/evaluate.py MODEL_DIR [--json out.json]
The production path (`universalseg predict` on the input grid) is checked in Testing/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from UniversalSegLib.store import load_model

HERE = Path(__file__).resolve().parent


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--json", default=None)
    ap.add_argument("--holdout-top", type=float, default=0.0, help="score only the held-out top slices")
    args = ap.parse_args()
    loaded = load_model(args.model)
    keys = loaded.manifest.class_keys
    data = np.load(HERE / "build" / "bundle.npz")
    meta = json.loads(str(data["meta"]))
    results, probs = {}, {}
    for i, src in enumerate(meta["sources"]):
        scan = src["scan"]
        if scan not in probs:
            image = torch.from_numpy(data[f"image_{scan}"].astype(np.float32))[None, None]
            with torch.no_grad():
                logits = sliding_window_inference(image, (96, 96, 96), 4, loaded.model, overlap=0.5, mode="gaussian")
            probs[scan] = torch.sigmoid(logits)[0].numpy()
        labels = data[f"labels_{i}"]
        first = int(round(labels.shape[3] * (1 - args.holdout_top))) if args.holdout_top else 0
        pred = probs[scan][..., first:] > 0.5
        results[src["name"]] = {k: round(dice(pred[keys.index(k)], labels[j][..., first:] > 0), 3)
                                for j, k in enumerate(src["classes"]) if labels[j][..., first:].any()}
        print(src["name"], results[src["name"]])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
