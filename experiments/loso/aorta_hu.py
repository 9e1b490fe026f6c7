"""HU inside scan B's aorta, its two lumens (an aortic dissection) and T12, against the range the
`generalise` stage paints arteries with in the arterial phase (`synth.TISSUES`).

    python -m experiments.loso.aorta_hu [--data DIR]      # from the repo root

Why: a model trained on scan A alone gives B's aorta L1/L2 vertebra probability instead (session 9).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from experiments.paths import SHARED_DATA
from UniversalSegLib.data.synth import TISSUES

MASKS = ("aorta", "aorta_true_lumen", "aorta_false_lumen", "vertebrae_T12")
PERCENTILES = (5, 25, 50, 75, 95)


def hu_table(scan: Path) -> dict[str, np.ndarray]:
    """Percentiles (`PERCENTILES`) of the HU inside each of `MASKS`."""
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(scan / "ct.nii.gz")))
    table = {}
    for name in MASKS:
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(scan / "masks" / f"{name}.nii.gz"))) > 0
        table[name] = np.percentile(image[mask], PERCENTILES)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    args = parser.parse_args()
    print("HU percentiles " + " / ".join(map(str, PERCENTILES)))
    for name, values in hu_table(args.data / "ct-thorax-aorta").items():
        print(f"{name:20s} " + " / ".join(f"{v:.0f}" for v in values))
    low, high = TISSUES["artery"].arterial
    print(f"synthetic artery, arterial phase: mean drawn from {low:.0f}-{high:.0f} HU")


if __name__ == "__main__":
    main()
