"""Benchmark: what blanking the arms in the model's input costs (`plausibility.blank_limbs`, run by
`predict` before preprocessing when every computed class is trunk-only; issue 25).

Baseline, measured in the same run: `preprocess` of the same image (reorient, body crop,
resampling, HU window), the step it precedes. Images:
  A, B, C            the three real scans (no arms: the limb finder runs and finds none)
  A-clinical         A resampled to a clinical grid (0.75 mm in-plane, 1.5 mm slices: 488x404x224)
  A-clinical+arm     the same with an upper arm drawn beside it (the blanking then copies the image)

    OMP_NUM_THREADS=1 python benchmarks/bench_limb_blanking.py [--repeat 3] [--predict-repeat 3]

Prints, per image, the median seconds of blank_limbs and of preprocess, and their ratio. Then the
limb finder's result shared (`plausibility.Trunk`, as `predict` does) against found anew by each of
its three uses in a prediction (baseline: the code before the sharing), measured in the same run:
  - the three uses alone (blank_limbs, the rules' `without_limbs` and `check`), per image, with
    reference masks: A's aorta, spleen and L1 (on the clinical grids by nearest neighbour), B's
    aorta and T12, C's heart and pulmonary artery;
  - the whole `predict` (bundled model, CPU, classes aorta, spleen, L1, L4 with their helpers) on
    A with arms composed beside it (`evaluation.variants.compose_arms`), alternating shared and
    anew; also checks that both give the same masks, confidences and reasons.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from unittest import mock

import numpy as np
import SimpleITK as sitk
from _common import REPO, median_seconds, require_checkout  # benchmarks/_common.py (this script's folder)

require_checkout()
from UniversalSegLib.evaluation import variants  # noqa: E402
from UniversalSegLib.geometry import resample_to_spacing  # noqa: E402
from UniversalSegLib.inference import plausibility  # noqa: E402
from UniversalSegLib.inference.masks import BoxMask  # noqa: E402
from UniversalSegLib.inference.plausibility import Trunk, blank_limbs, check, without_limbs  # noqa: E402
from UniversalSegLib.inference.preprocess import preprocess  # noqa: E402
from UniversalSegLib.registry import default_registry  # noqa: E402
from UniversalSegLib.store import DEFAULT_MODEL, find_model, read_manifest  # noqa: E402

DATA = REPO / "Testing" / "data" / "shared"
SCANS = {"A": "ct-abdomen/ct.nii.gz", "B": "ct-thorax-aorta/ct.nii.gz", "C": "ct-chest-pa/ct.nii.gz"}
REFERENCE_MASKS = {"A": ("aorta", "spleen", "vertebrae_L1"), "B": ("aorta", "vertebrae_T12"),
                   "C": ("heart", "pulmonary_artery")}  # what the rules check in the timing
PREDICT_CLASSES = ["aorta", "spleen", "vertebrae_L1", "vertebrae_L4"]


@contextmanager
def finder_per_use():
    """The code before the sharing: each use finds its own `Trunk`, whatever it is handed."""
    with mock.patch.object(plausibility, "_trunk_of", lambda reference, trunk: Trunk(reference)):
        yield


def _reference_masks(name: str, image: sitk.Image) -> dict[str, BoxMask]:
    """The scan's reference masks of `REFERENCE_MASKS` on `image`'s grid (nearest neighbour)."""
    scan = name.split("-")[0]
    folder = DATA / SCANS[scan].split("/")[0]
    if scan == "A":
        labels = sitk.ReadImage(str(folder / "labels_totalsegmentator_v2.nii.gz"))
        ids = variants.label_ids()
        sources = {key: labels == ids[key] for key in REFERENCE_MASKS[scan]}
    else:
        sources = {key: sitk.ReadImage(str(folder / "masks" / f"{key}.nii.gz")) > 0 for key in REFERENCE_MASKS[scan]}
    return {key: BoxMask.from_array(sitk.GetArrayFromImage(
        sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)).astype(bool))
        for key, mask in sources.items()}


def _finder_uses(image: sitk.Image, masks: dict[str, BoxMask], trunk: Trunk | None) -> None:
    """What a prediction asks of the limb finder: the blanking, then the two plausibility rules."""
    classes = {key: default_registry()[key] for key in masks}
    blank_limbs(image, list(default_registry()), trunk)
    without_limbs(masks, classes, image, trunk)
    check(masks, dict.fromkeys(masks, 0.97), classes, image, trunk=trunk)


def _same_results(a, b) -> bool:
    return all(x.info.key == y.info.key and np.array_equal(x.mask, y.mask) and x.mean_confidence == y.mean_confidence
               and x.reason == y.reason for x, y in zip(a.classes, b.classes, strict=True))


def time_sharing(images: dict[str, sitk.Image], repeat: int, predict_repeat: int) -> None:
    """Print the finder's three uses and the whole predict, shared against found anew per use."""
    from UniversalSegLib import predict

    print(f"\n{'image':16s} {'3 uses anew s':>14s} {'shared s':>9s} {'saved s':>8s} {'ratio':>6s}")
    for name, image in images.items():
        masks = _reference_masks(name, image)
        with finder_per_use():
            anew = median_seconds(lambda image=image, masks=masks: _finder_uses(image, masks, None), repeat)
        shared = median_seconds(lambda image=image, masks=masks: _finder_uses(image, masks, Trunk(image)), repeat)
        print(f"{name:16s} {anew:14.3f} {shared:9.3f} {anew - shared:8.3f} {anew / shared:6.2f}", flush=True)
    if predict_repeat == 0:
        return
    image = images["A"]
    composed = variants.compose_arms(image, None, [variants.Arm("low", 0.0), variants.Arm("high", 10.0)])[0]
    def run():
        return predict(composed, device="cpu", classes=PREDICT_CLASSES, include_helper_classes=True)

    results = {"shared": run()}  # also the warm-up (model loading)
    with finder_per_use():
        results["anew"] = run()
    times: dict[str, list[float]] = {"shared": [], "anew": []}
    for _ in range(predict_repeat):  # alternating: the machine's load weighs on both alike
        times["shared"].append(median_seconds(run, 1))
        with finder_per_use():
            times["anew"].append(median_seconds(run, 1))
    shared, anew = (float(np.median(times[k])) for k in ("shared", "anew"))
    size = "x".join(str(n) for n in composed.GetSize())
    print(f"\npredict of A+arms ({size}, {len(results['shared'].classes)} classes, "
          f"{results['shared'].metadata['limbs_blanked_ml']:.0f} ml blanked): finder anew per use {anew:.2f} s, "
          f"shared {shared:.2f} s, saved {anew - shared:.2f} s ({(anew - shared) / anew:.1%}); "
          f"same masks, confidences and reasons: {_same_results(results['shared'], results['anew'])}")


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
    parser.add_argument("--predict-repeat", type=int, default=3, help="predictions per variant (0: none)")
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
    time_sharing(images, args.repeat, args.predict_repeat)


if __name__ == "__main__":
    main()
