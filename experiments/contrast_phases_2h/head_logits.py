"""Is a class's head dead or only shifted? Its logits inside and outside its label, and how well they
rank its voxels (ROC AUC), on a 64^3 patch of a training run's cached case centred on the label.

    python -m experiments.contrast_phases_2h.head_logits MODEL RUN/cache/abdomen-gi-vessels-bones \
        portal_vein_and_splenic_vein aorta

Session 16 found v0.4.1's portal/splenic vein head at logits -18 to -47 on A (its training scan),
yet ranking its voxels with AUC 0.91: a shifted head, not a blind one (README.md, "Stage 2p").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_roc_auc

from UniversalSegLib.data.cache import CachedCase
from UniversalSegLib.store import load_model

PATCH = 64


def centred_patch(mask: np.ndarray) -> tuple[slice, ...]:
    """A PATCH^3 box around the mask's centroid, inside the volume."""
    centre = np.argwhere(mask).mean(0).round().astype(int)
    starts = [int(np.clip(c - PATCH // 2, 0, max(0, s - PATCH))) for c, s in zip(centre, mask.shape)]
    return tuple(slice(a, a + PATCH) for a in starts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("cache", type=Path, help="a dataset's folder of a run's cache (RUN/cache/NAME)")
    parser.add_argument("classes", nargs="+")
    args = parser.parse_args()
    entry = next(p for p in sorted(args.cache.iterdir()) if (p / "meta.json").is_file())
    case = CachedCase.open(entry)
    keys = json.loads((entry / "meta.json").read_text())["class_keys"]
    loaded = load_model(args.model)
    model, model_keys = loaded.model.eval(), loaded.manifest.class_keys
    labels, image = case.labels(), np.clip(case.image(), 0, 1)
    for key in args.classes:
        mask = labels[keys.index(key)] > 0
        box = centred_patch(mask)
        x = torch.from_numpy(np.ascontiguousarray(image[box], dtype=np.float32))[None, None]
        with torch.no_grad():
            logits = model(x, [model_keys.index(key)])[0, 0]
        inside = torch.from_numpy(mask[box])
        auc = compute_roc_auc(logits.flatten(), inside.flatten().float())
        print(f"{key}: logits inside mean {logits[inside].mean():.1f} max {logits[inside].max():.1f}; "
              f"outside mean {logits[~inside].mean():.1f}, 99.9th percentile {logits[~inside].quantile(0.999):.1f}; "
              f"AUC {auc:.3f}; Dice at 0.5 "
              f"{2 * float(((logits > 0) & inside).sum()) / max(1, int((logits > 0).sum() + inside.sum())):.3f}")


if __name__ == "__main__":
    main()
