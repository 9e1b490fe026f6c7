"""Issue 25's figures: the bundled model on scans A, B, C, on arms composed beside them and on A
and B re-enhanced to a portal-venous phase (`UniversalSegLib.evaluation.variants`), before and after the
plausibility check. `A_upper` is a 120 mm upper-abdominal slab of A (liver to kidneys), and
`A_upper_pv_arms` the same slab re-enhanced to portal-venous with both arms down beside it: the
hidden clinical scan's situation (issue 25), measured against `A_upper`.

    python -m experiments.measure_variants run OUT        # from the repo root; ~2-3 min per variant on 2 cores
    python -m experiments.measure_variants run AFTER --plausibility
    python -m experiments.measure_variants report OUT --after AFTER --json figures.json

`run` predicts every class through `UniversalSegLib.predict` with the plausibility check off (on
with `--plausibility`, into another folder) and saves each variant's masks, confidences and
probabilities (OUT/<variant>.npz, with the variant's image and arm mask). `report` takes the
"after" figures from the `--after` folder (predict's own run with the check), else applies
`plausibility.check` to the saved masks, and prints per variant: components in the arms (class,
ml, mean probability there), what the check changed and why, Dice of the scan's labelled
classes, and how many wrong masks are left unflagged (below 0.9 confidence or with a reason is
flagged).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from experiments.paths import SHARED_DATA, scan_a_sources
from UniversalSegLib.components import connected_components
from UniversalSegLib.continual.evaluate import dice
from UniversalSegLib.evaluation.variants import (
    PV_TARGET_HU,
    Arm,
    compose_arms,
    crop_to,
    mid_slice,
    portal_venous,
    reenhance,
    slab,
)
from UniversalSegLib.inference.masks import BoxMask
from UniversalSegLib.inference.plausibility import Outcome, check
from UniversalSegLib.inference.predict import predict
from UniversalSegLib.io.stats import LOW_CONFIDENCE

DATA = SHARED_DATA
SCANS = {"A": "ct-abdomen/ct.nii.gz", "B": "ct-thorax-aorta/ct.nii.gz", "C": "ct-chest-pa/ct.nii.gz"}
A_LABELS = DATA / "ct-abdomen" / "labels_totalsegmentator_v2.nii.gz"
PV_CLASSES = ("aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "liver", "spleen",
              "kidney_left", "kidney_right")
WRONG_ARM_ML = 0.5  # a component this large in an arm makes the class's mask wrong
WRONG_DICE = 0.5  # below this against a scan's labels, a mask is wrong
# Classes whose anatomy lies wholly below the chest: any mask of them on B or C is wrong.
ABSENT_IN_CHEST = ("urinary_bladder", "prostate_or_uterus", "sacrum", "vertebrae_L2", "vertebrae_L3", "vertebrae_L4",
                   "vertebrae_L5", "hip_left", "hip_right", "femur_left", "femur_right", "gluteus_maximus_left",
                   "gluteus_maximus_right", "iliac_artery_left", "iliac_artery_right", "iliac_vena_left",
                   "iliac_vena_right")


UPPER_SLICES = 40  # A_upper: 120 mm at A's 3 mm, centred on the upper-abdominal organs
UPPER_ORGANS = ("liver", "spleen", "pancreas", "kidney_left", "kidney_right")


def a_label_ids() -> dict[str, int]:
    """Class key -> label id of scan A's two datasets in recipe.yaml."""
    return scan_a_sources()[2]


def variants() -> dict[str, tuple[sitk.Image, sitk.Image, np.ndarray | None]]:
    """name -> (image, reference scan, arm mask or None)."""
    scans = {k: sitk.ReadImage(str(DATA / p)) for k, p in SCANS.items()}
    labels = sitk.ReadImage(str(A_LABELS))
    out: dict[str, tuple] = {k: (img, img, None) for k, img in scans.items()}
    layouts = {
        "A_arms_apart": ("A", [Arm("low", 15.0), Arm("high", 25.0, shift_mm=-15.0)]),
        "A_arms_touching": ("A", [Arm("low", -3.0, shift_mm=20.0, z_from=0.3), Arm("high", 0.0, radius_mm=50.0)]),
        "B_arms": ("B", [Arm("low", 5.0, radius_mm=40.0), Arm("high", 0.0, shift_mm=10.0)]),
        "C_arms": ("C", [Arm("low", 0.0), Arm("high", 10.0, radius_mm=50.0)]),
    }
    for name, (scan, arms) in layouts.items():
        image, _, arm_mask = compose_arms(scans[scan], None, arms, seed=len(name))
        out[name] = (image, scans[scan], arm_mask)
    out["A_portal_venous"] = (portal_venous(scans["A"], labels), scans["A"], None)
    first = upper_first_slice(labels)
    upper = slab(scans["A"], first, UPPER_SLICES)
    out["A_upper"] = (upper, upper, None)
    pv_upper = slab(out["A_portal_venous"][0], first, UPPER_SLICES)
    arms = [Arm("low", 0.0, shift_mm=10.0, radius_mm=45.0), Arm("high", 8.0, shift_mm=-5.0, radius_mm=42.0)]
    image, _, arm_mask = compose_arms(pv_upper, None, arms, seed=7)
    out["A_upper_pv_arms"] = (image, upper, arm_mask)
    # B's arteries (arterial phase, an aortic dissection) lowered to portal-venous values
    b_masks = {k: v for k, v in truths_of("B").items() if k in PV_TARGET_HU}
    out["B_portal_venous"] = (reenhance(scans["B"], b_masks), scans["B"], None)
    return out


def upper_first_slice(labels: sitk.Image) -> int:
    """First slice of A's upper-abdominal slab (`UPPER_SLICES`, centred on `UPPER_ORGANS`)."""
    ids = a_label_ids()
    mid = mid_slice(labels, [ids[k] for k in UPPER_ORGANS])
    return int(np.clip(mid - UPPER_SLICES // 2, 0, labels.GetSize()[2] - UPPER_SLICES))


def base_scan(name: str) -> str:
    """The scan a variant is measured against: A_upper for its own variants, else the first letter."""
    return "A_upper" if name.startswith("A_upper") else name[0]


def run(outdir: Path, only: list[str] | None, plausibility: bool = False, model: str | None = None) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    for name, (image, _, arm_mask) in variants().items():
        if only and name not in only:
            continue
        result = predict(image, model=model, device="cpu", keep_probabilities=True,
                         plausibility=plausibility)
        arrays = {"hu": sitk.GetArrayFromImage(image).astype(np.int16),
                  "arm": arm_mask if arm_mask is not None else np.zeros(0, bool)}
        for c in result.classes:
            arrays[f"mask_{c.info.key}"] = c.mask
            arrays[f"prob_{c.info.key}"] = c.probability
        conf = {c.info.key: c.mean_confidence for c in result.classes}
        reasons = {c.info.key: c.reason for c in result.classes if c.reason}
        np.savez_compressed(outdir / f"{name}.npz", **arrays)
        meta = {"confidence": conf, "reasons": reasons, "metadata": result.metadata, "spacing": image.GetSpacing(),
                "origin": image.GetOrigin(), "direction": image.GetDirection()}
        (outdir / f"{name}.json").write_text(json.dumps(meta, default=str))
        print(name, f"{result.metadata['total_s']:.0f} s", flush=True)


def _load(outdir: Path, name: str):
    meta = json.loads((outdir / f"{name}.json").read_text())
    data = np.load(outdir / f"{name}.npz")
    image = sitk.GetImageFromArray(data["hu"].astype(np.float32))
    image.SetSpacing(meta["spacing"])
    image.SetOrigin(meta["origin"])
    image.SetDirection(meta["direction"])
    keys = list(meta["confidence"])
    masks = {k: BoxMask.from_array(data[f"mask_{k}"]) for k in keys}
    probs = {k: data[f"prob_{k}"] for k in keys}
    arm = data["arm"] if data["arm"].size else None
    return image, masks, probs, meta["confidence"], arm, meta.get("reasons", {})


def _arm_components(mask: BoxMask, prob: np.ndarray, arm: np.ndarray, voxel_ml: float) -> list[dict]:
    """Components of `mask` with at least half their voxels in the arm: ml and mean probability."""
    full = mask.array()
    labels, n = connected_components(full, connectivity=26, return_N=True)
    found = []
    for i in range(1, n + 1):
        comp = labels == i
        inside = np.count_nonzero(comp & arm)
        if inside * 2 >= np.count_nonzero(comp) and inside * voxel_ml >= WRONG_ARM_ML:
            found.append({"ml": round(float(np.count_nonzero(comp)) * voxel_ml, 2),
                          "mean_probability": round(float(prob[comp].mean()) / 255, 3)})
    return found


def truths_of(scan: str) -> dict[str, np.ndarray]:
    """The scan's labelled classes' reference masks on its own grid."""
    if scan == "A":
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(A_LABELS)))
        return {k: a == i for k, i in a_label_ids().items()}
    folder = (DATA / SCANS[scan]).parent / "masks"
    return {p.name.removesuffix(".nii.gz"): sitk.GetArrayFromImage(sitk.ReadImage(str(p))) > 0
            for p in folder.glob("*.nii.gz")}


def truths() -> dict[str, dict[str, np.ndarray]]:
    """Per scan (and A_upper), the labelled classes' reference masks on its own grid."""
    out = {scan: truths_of(scan) for scan in SCANS}
    first = upper_first_slice(sitk.ReadImage(str(A_LABELS)))
    out["A_upper"] = {k: v[first:first + UPPER_SLICES] for k, v in out["A"].items()}
    return out


def report(outdir: Path, after_dir: Path | None = None) -> dict:
    from UniversalSegLib.registry import default_registry

    registry = default_registry()
    scans = {k: sitk.ReadImage(str(DATA / p)) for k, p in SCANS.items()}
    scans["A_upper"] = slab(scans["A"], upper_first_slice(sitk.ReadImage(str(A_LABELS))), UPPER_SLICES)
    references = truths()
    figures: dict = {}
    for path in sorted(outdir.glob("*.npz")):
        name = path.stem
        image, masks, probs, conf, arm, _ = _load(outdir, name)
        classes = {k: registry[k] for k in masks}
        if after_dir and (after_dir / f"{name}.npz").exists():  # predict's own run with the check
            _, a_masks, a_probs, a_conf, _, a_reasons = _load(after_dir, name)
            after = Outcome(a_masks, a_conf, a_reasons)
            probs = {**probs, **{f"after_{k}": v for k, v in a_probs.items()}}
            row_source = "predict with plausibility"
        else:  # the check applied to the saved masks (not the deferral of the largest component)
            after = check(masks, conf, classes, image)
            row_source = "check() on the saved masks"
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000
        row: dict = {"after_from": row_source, "changed": {}, "arm_components": {}, "dice": {},
                     "unflagged_wrong": {}}
        for k in masks:
            if after.masks[k].count != masks[k].count or k in after.reasons:
                row["changed"][k] = {"ml_before": round(masks[k].count * voxel_ml, 2),
                                     "ml_after": round(after.masks[k].count * voxel_ml, 2),
                                     "confidence": [round(conf[k], 3), round(after.confidence[k], 3)],
                                     "reason": after.reasons.get(k, "")}
        wrong: dict[str, set] = {"before": set(), "after": set()}
        flagged = {"before": {k for k in masks if masks[k] and conf[k] < LOW_CONFIDENCE},
                   "after": {k for k in masks if after.masks[k] and (after.confidence[k] < LOW_CONFIDENCE
                                                                     or k in after.reasons)}}
        final = {"before": masks, "after": after.masks}
        if arm is not None:
            for stage, ms in final.items():
                for k, m in ms.items():
                    prob = probs[f"after_{k}"] if stage == "after" and f"after_{k}" in probs else probs[k]
                    comps = _arm_components(m, prob, arm, voxel_ml) if m else []
                    if comps:
                        wrong[stage].add(k)
                        row["arm_components"].setdefault(stage, {})[k] = comps
        scan = base_scan(name)
        for stage, ms in final.items():
            for k, m in ms.items():
                if m and scan in ("B", "C") and k in ABSENT_IN_CHEST:
                    wrong[stage].add(k)
                if k not in references[scan]:
                    continue
                full = m.array()
                full = crop_to(full, scans[scan], image) if arm is not None else full
                d = dice(full, references[scan][k])
                row["dice"].setdefault(stage, {})[k] = None if d is None else round(d, 3)
                if m and (d is None or d < WRONG_DICE):
                    wrong[stage].add(k)
        for stage in ("before", "after"):
            row["unflagged_wrong"][stage] = sorted(wrong[stage] - flagged[stage])
            row.setdefault("wrong", {})[stage] = sorted(wrong[stage])
        figures[name] = row
        counts = {s: (len(wrong[s]), len(row["unflagged_wrong"][s])) for s in ("before", "after")}
        print(f"== {name}: wrong masks (unflagged) before {counts['before']}, after {counts['after']}")
        for k, c in row["changed"].items():
            print(f"   changed {k}: {c}")
        for stage, comps in row["arm_components"].items():
            print(f"   in the arms ({stage}): {comps}")
    for name, row in figures.items():
        native = figures.get(base_scan(name), {}).get("dice", {}).get("after")
        if name != base_scan(name) and native and "after" in row["dice"]:
            # B_portal_venous: B's 7 classes
            keys = PV_CLASSES if name in ("A_portal_venous", "A_upper_pv_arms") else list(native)
            row["dice_change"] = {k: None if native.get(k) is None or row["dice"]["after"].get(k) is None
                                  else round(row["dice"]["after"][k] - native[k], 3) for k in keys}
            worst = min((v for v in row["dice_change"].values() if v is not None), default=None)
            print(f"   {name}: Dice change vs {base_scan(name)} (after), worst {worst}: {row['dice_change']}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("run", "report"))
    parser.add_argument("out", type=Path, help="folder of the saved predictions")
    parser.add_argument("--only", nargs="*", help="variants to run (default: all)")
    parser.add_argument("--json", type=Path, help="write the report's figures here")
    parser.add_argument("--model", help="run: model folder or name (default: the bundled model)")
    parser.add_argument("--plausibility", action="store_true", help="run: predict with the check (predict's default)")
    parser.add_argument("--after", type=Path, help="report: a `run --plausibility` folder for the 'after' figures")
    args = parser.parse_args()
    if args.step == "run":
        run(args.out, args.only, args.plausibility, args.model)
    else:
        figures = report(args.out, args.after)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
