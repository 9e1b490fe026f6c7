"""Dice of the production path on scan A: `predict` on A's own grid, post-processed, for every class
the two A sources label, beside the model-space Dice of `evaluate.py` when its JSON is given.

    python -m experiments.model_space_dice MODEL --json model_space.json      # optional
    python -m experiments.v0_4_thorax_context.production_dice_A \
        [--model MODEL] [--model-space model_space.json] [--json out.json]

A row far below its model-space figure points at inference or post-processing, not at the weights
(session 10: the left hip bone, 0.000 here against 0.811, lost to the left/right split).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import SimpleITK as sitk

from experiments.model_space_dice import dice  # the recipe's model-space evaluation
from experiments.paths import scan_a_sources
from UniversalSegLib.inference.predict import predict

A_SOURCES = ("abdomen-organs", "abdomen-gi-vessels-bones")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--model-space", type=Path, help="evaluate.py's JSON, for comparison")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    image, label_map, ids = scan_a_sources()
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_map)))
    result = predict(str(image), model=args.model, classes=list(ids), device="cpu")
    model_space = {}
    if args.model_space:
        figures = json.loads(args.model_space.read_text())
        model_space = {k: v for name in A_SOURCES for k, v in figures[name].items()}
    production = {}
    for c in result.classes:
        production[c.info.key] = round(dice(c.mask.astype(bool), labels == ids[c.info.key]), 3)
        print(f"{c.info.key:30s} production {production[c.info.key]:.3f}"
              + (f"  model space {model_space[c.info.key]:.3f}" if c.info.key in model_space else ""))
    if args.json:
        args.json.write_text(json.dumps({"production": production, "model_space": model_space}, indent=1))


if __name__ == "__main__":
    main()
