"""Benchmark: what blanking the arms in the model's input costs (`plausibility.blank_limbs`, run by
`predict` before preprocessing when every computed class is trunk-only; issue 25).

Baseline, measured in the same run: `preprocess` of the same image (reorient, body crop,
resampling, HU window), the step it precedes. Images:
  A, B, C            the three real scans (no arms: the limb finder runs and finds none)
  A-clinical         A resampled to a clinical grid (0.75 mm in-plane, 1.5 mm slices: 488x404x224)
  A-clinical+arm     the same with an upper arm drawn beside it (the blanking then copies the image)

    OMP_NUM_THREADS=1 python benchmarks/bench_limb_blanking.py [--repeat 3]

Prints, per image, the median seconds of blank_limbs and of preprocess, and their ratio.
"""

from __future__ import annotations

import argparse

import numpy as np
import SimpleITK as sitk
from _common import REPO, median_seconds, require_checkout  # benchmarks/_common.py (this script's folder)

require_checkout()
from UniversalSegLib.geometry import resample_to_spacing  # noqa: E402
from UniversalSegLib.inference.plausibility import blank_limbs  # noqa: E402
from UniversalSegLib.inference.preprocess import preprocess  # noqa: E402
from UniversalSegLib.registry import default_registry  # noqa: E402
from UniversalSegLib.store import DEFAULT_MODEL, find_model, read_manifest  # noqa: E402

DATA = REPO / "Testing" / "data" / "shared"
SCANS = {"A": "ct-abdomen/ct.nii.gz", "B": "ct-thorax-aorta/ct.nii.gz", "C": "ct-chest-pa/ct.nii.gz"}


def _with_arm(image: sitk.Image, radius_mm: float = 45.0, gap_mm: float = 15.0) -> sitk.Image:
    """`image` widened with air on the high-x side and an upper arm (muscle, humerus) drawn there."""
    hu = sitk.GetArrayFromImage(image)
    sx, sy, _ = image.GetSpacing()
    pad = int(np.ceil((gap_mm + 2 * radius_mm + 15.0) / sx))
    edge = int(np.flatnonzero((hu > -500).any(axis=(0, 1)))[-1])
    hu = np.pad(hu, ((0, 0), (0, 0), (0, pad)), constant_values=-1000)
    yy, xx = np.indices(hu.shape[1:])
    cy, cx = hu.shape[1] / 2, edge + (gap_mm + radius_mm) / sx
    distance = np.hypot((yy - cy) * sy, (xx - cx) * sx)
    hu[:, distance <= radius_mm] = 50
    hu[:, distance <= 11.0] = 1000
    out = sitk.GetImageFromArray(hu)
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(image.GetDirection())
    out.SetOrigin(image.GetOrigin())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    pre = read_manifest(find_model(DEFAULT_MODEL)).preprocessing
    classes = list(default_registry())
    images = {k: sitk.ReadImage(str(DATA / p)) for k, p in SCANS.items()}
    clinical = sitk.Cast(resample_to_spacing(images["A"], (0.75, 0.75, 1.5), sitk.sitkLinear, -1000.0), sitk.sitkInt16)
    images["A-clinical"] = clinical
    images["A-clinical+arm"] = _with_arm(clinical)
    print(f"{'image':16s} {'size':>16s} {'blank_limbs s':>14s} {'preprocess s':>13s} {'ratio':>6s} {'blanked ml':>10s}")
    for name, image in images.items():
        blanked_ml = blank_limbs(image, classes)[1]
        blank_s = median_seconds(lambda image=image: blank_limbs(image, classes), args.repeat)
        pre_s = median_seconds(lambda image=image: preprocess(image, pre), args.repeat)
        size = "x".join(str(n) for n in image.GetSize())
        print(f"{name:16s} {size:>16s} {blank_s:14.3f} {pre_s:13.3f} {blank_s / pre_s:6.2f} {blanked_ml:10.0f}",
              flush=True)


if __name__ == "__main__":
    main()
