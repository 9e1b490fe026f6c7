"""Control for the arm variants: the scan itself, padded with air onto each variant's grid and no
arm drawn, through `predict` (default settings). The variants widen the plane with air, and the
bodies of A, B and C reach their plane's border, so the body crop gains its margin there and the
sliding windows shift: that moves the model's output without any arm. Against this control, only
the arm differs.

    python experiments/v0.4.2_limbs_blanked/padded_control.py AFTER OUT.json [--only A_arms_touching B_arms]

AFTER: a `measure_variants.py run --plausibility` folder (its <variant>.json/.npz give each
variant's grid and masks, <scan>.npz the scan's own). Writes, per variant and labelled class,
Dice against the scan's labels of the scan, of the padded control and of the variant, and the
variant's change against each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import UniversalSegLib
from UniversalSegLib.continual.evaluate import dice
from UniversalSegLib.inference.predict import predict

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "Testing" / "data" / "shared"
SCANS = {"A": DATA / "ct-abdomen" / "ct.nii.gz", "B": DATA / "ct-thorax-aorta" / "ct.nii.gz",
         "C": DATA / "ct-chest-pa" / "ct.nii.gz"}
A_LABELS = DATA / "ct-abdomen" / "labels_totalsegmentator_v2.nii.gz"
NAMES = Path(UniversalSegLib.__file__).parent / "resources" / "sample" / "totalsegmentator_v2_label_names.json"
ALIASES = {"intestine": "small_bowel", "prostate_or_uterus": "prostate"}  # registry key -> label name


def _padded(a: sitk.Image, meta: dict, shape: tuple[int, ...]) -> tuple[sitk.Image, int]:
    """Scan `a` on the variant's grid, air elsewhere, and the x offset of its first column."""
    grid = sitk.Image(shape[2], shape[1], shape[0], sitk.sitkInt16)
    grid.SetSpacing(meta["spacing"])
    grid.SetOrigin(meta["origin"])
    grid.SetDirection(meta["direction"])
    offset = grid.TransformPhysicalPointToIndex(a.GetOrigin())[0]
    hu = np.full(shape, -1000, np.int16)
    hu[:, :, offset:offset + a.GetSize()[0]] = sitk.GetArrayFromImage(a)
    out = sitk.GetImageFromArray(hu)
    out.CopyInformation(grid)
    return out, offset


def _truths(scan: str) -> dict[str, np.ndarray]:
    """The scan's labelled classes: A's label map, B's and C's mask files."""
    if scan == "A":
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(A_LABELS)))
        ids = {v: int(k) for k, v in json.loads(NAMES.read_text()).items()}
        return {key: labels == ids[name] for key in {*ids, *ALIASES}
                if (name := ALIASES.get(key, key)) in ids and (labels == ids[name]).any()}
    return {p.name.removesuffix(".nii.gz"): sitk.GetArrayFromImage(sitk.ReadImage(str(p))) > 0
            for p in (SCANS[scan].parent / "masks").glob("*.nii.gz")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("after", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", nargs="*", default=["A_arms_apart", "A_arms_touching", "B_arms", "C_arms"])
    args = parser.parse_args()
    figures = {}
    for name in args.only:
        scan = name[0]
        original = sitk.ReadImage(str(SCANS[scan]))
        truths = _truths(scan)
        native = np.load(args.after / f"{scan}.npz")
        meta = json.loads((args.after / f"{name}.json").read_text())
        variant = np.load(args.after / f"{name}.npz")
        image, offset = _padded(original, meta, variant["hu"].shape)
        control = {c.info.key: c.mask for c in predict(image, device="cpu").classes}
        nx = original.GetSize()[0]
        row = {}
        for key in meta["confidence"]:
            if key not in truths:
                continue
            truth = truths[key]
            scores = {"scan": dice(native[f"mask_{key}"].astype(bool), truth),
                      "control": dice(control[key][:, :, offset:offset + nx], truth),
                      "variant": dice(variant[f"mask_{key}"][:, :, offset:offset + nx].astype(bool), truth)}
            scores = {k: None if v is None else round(float(v), 3) for k, v in scores.items()}
            if None not in scores.values():
                scores["variant_minus_scan"] = round(scores["variant"] - scores["scan"], 3)
                scores["variant_minus_control"] = round(scores["variant"] - scores["control"], 3)
            row[key] = scores
        figures[name] = row
        changes = {k: v["variant_minus_control"] for k, v in row.items() if "variant_minus_control" in v}
        beyond = {k: v for k, v in changes.items() if abs(v) > 0.02}
        print(name, "against the padded control: worst", min(changes.values()), "largest", max(changes.values()),
              "beyond 0.02:", beyond, flush=True)
    args.out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
