"""Is it the LPG's global feature that hides B's liver and spleen? (session 8 diagnostic)

Runs the bundled model on scan B three ways: as is; with every window's global image feature replaced
by the mean feature of B's lowest 90 mm (where the spleen is found); and by the mean over scan A's
windows. If the global feature were the cause, the swaps would bring the organs back. They did not
(v0.3.0: liver 6-7 ml, spleen 7 ml every time), so the thorax acts through the voxel features
(convolutions and GroupNorm statistics over the window), not through the class heads' parameters.

    python -m experiments.v0_4_thorax_context.global_feature_swap [MODEL]      # from the repo root
"""

import sys

import SimpleITK as sitk
import torch

from experiments.check_generalisation import SHOWN, confidences
from experiments.paths import SHARED_DATA as DATA
from UniversalSegLib.evaluation.variants import slab
from UniversalSegLib.inference.predict import predict
from UniversalSegLib.model.universal import UniversalModel
from UniversalSegLib.store import load_model

original = UniversalModel.features


def window_features(model, image: sitk.Image) -> torch.Tensor:
    """The global image feature of every window `predict` runs on `image`."""
    seen = []

    def recording(self, x):
        feature, voxel = original(self, x)
        seen.append(feature.detach().clone())
        return feature, voxel

    UniversalModel.features = recording
    try:
        predict(image, model, classes=SHOWN, device="cpu")
    finally:
        UniversalModel.features = original
    return torch.cat(seen)


def volumes_with(model, image: sitk.Image, feature: torch.Tensor | None) -> dict:
    def fixed(self, x):
        own, voxel = original(self, x)
        return feature.expand_as(own).to(own), voxel

    UniversalModel.features = original if feature is None else fixed
    try:
        rows = confidences(predict(image, model, classes=SHOWN, device="cpu"))
    finally:
        UniversalModel.features = original
    return {key: row["volume_ml"] for key, row in rows.items()}


def main() -> None:
    model = load_model(sys.argv[1] if len(sys.argv) > 1 else None)
    scan_b = sitk.ReadImage(str(DATA / "ct-thorax-aorta" / "ct.nii.gz"))
    scan_a = sitk.ReadImage(str(DATA / "ct-abdomen" / "ct.nii.gz"))
    lowest = slab(scan_b, 0, int(round(90.0 / scan_b.GetSpacing()[2])))
    for name, feature in (("B as is", None), ("B, global feature of B's lowest 90 mm", window_features(model, lowest)),
                          ("B, global feature of scan A", window_features(model, scan_a))):
        print(name, volumes_with(model, scan_b, None if feature is None else feature.mean(0)), flush=True)


if __name__ == "__main__":
    main()
