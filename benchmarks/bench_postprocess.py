"""Post-processing on fragmented masks at clinical size: `predict`'s rule stage, timed.

A model on input it does not know (or with random weights) gives fragmented masks: speckle and
blobs, hundreds of thousands of components. This builds such masks for the 32 template classes of
the published checkpoints on the sample CT's clinical grid (0.8 x 0.8 x 1.5 mm: 458 x 379 x 224),
as `predict` hands them to its rule stage (largest-component classes already reduced by the
restorer, voxel values kept for the classes later rules need), then runs that stage: `disjoint`
(vessels against each other, organs against vessels), the split and within-parents rules, and the
confidences. `--baseline DIR` runs the same stage with another checkout's code (e.g. main) in a
fresh process with a time limit, interleaved with ours.

The sliding window that produces such masks (random-weight published U-Net, 96^3 windows, this grid,
2 cores) took 16.5 min at default precision and 3.4 min with --fast (issue 28's measurement).

    python benchmarks/bench_postprocess.py [--baseline /tmp/base28 --limit 600]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = (224, 379, 458)  # (z, y, x): the sample CT at 0.8 x 0.8 x 1.5 mm
SPACING_XYZ = (0.8, 0.8, 1.5)
MODEL_SPACING = (1.5, 1.5, 1.5)
SLIDING_WINDOW_S = {"default": 16.5 * 60, "fast": 3.4 * 60}


def fragmented_inputs(seed: int = 0):
    """(masks, values, confidence, classes) for the 32 template classes, as `predict` has them."""
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    from UniversalSegLib.components import largest_k
    from UniversalSegLib.inference.masks import BoxMask
    from UniversalSegLib.inference.postprocess import disjoint_keys
    from UniversalSegLib.registry import default_registry

    rng = np.random.default_rng(seed)
    classes = default_registry().template_32()
    field = ndimage.gaussian_filter(rng.standard_normal(SHAPE, dtype=np.float32), 2.0)
    field /= field.std()
    keys = {c.key for c in classes}
    separated = set(disjoint_keys(classes))
    masks, values, confidence = {}, {}, {}
    for c in classes:
        density = rng.uniform(0.005, 0.25)
        own = field + rng.standard_normal(SHAPE, dtype=np.float32)
        mask = own > np.quantile(own[::4, ::4, ::4], 1 - density)
        del own
        largest = c.postprocess == "largest_component" or (c.postprocess == "split_pair" and c.pair not in keys)
        if largest:  # the restorer keeps only the largest component of these
            mask = largest_k(mask, k=1) > 0
        box = BoxMask.from_array(mask)
        masks[c.key] = box
        confidence[c.key] = float(rng.uniform(0.5, 0.9))
        if c.key in separated or c.postprocess in ("split_pair", "within_parents") and not largest:
            values[c.key] = rng.integers(128, 256, box.count, dtype=np.uint8)
        del mask
    reference = sitk.Image([SHAPE[2], SHAPE[1], SHAPE[0]], sitk.sitkInt16)
    reference.SetSpacing(SPACING_XYZ)
    return masks, values, confidence, classes, reference


def rule_stage(masks, values, confidence, classes, reference) -> dict[str, float]:
    """`predict`'s post-processing block (same calls, same order), timed per step."""
    from UniversalSegLib.inference.postprocess import (
        apply_rules,
        disjoint,
        disjoint_keys,
        mean_within,
        outside_vessel_keys,
    )

    times = {}
    infos = {c.key: c for c in classes}
    separated, outside = set(disjoint_keys(classes)), set(outside_vessel_keys(classes))
    t = time.perf_counter()
    resolved = disjoint(masks, values, [k for k in infos if k in separated],
                        {k: confidence[k] for k in infos if k in outside})
    times["disjoint_s"] = time.perf_counter() - t
    t = time.perf_counter()
    final = apply_rules(resolved, infos, reference, MODEL_SPACING, rules=("split_pair", "within_parents"))
    times["split_and_parents_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for key in (k for k in values if final[k] is not masks[k]):
        sources = [(masks[k], values[k]) for k in (key, infos[key].pair) if k in values]
        confidence[key] = mean_within(final[key], sources)
    times["confidences_s"] = time.perf_counter() - t
    times["total_s"] = sum(times.values())
    times["voxels_kept"] = sum(m.count for m in final.values())
    return times


def worker() -> dict:
    t = time.perf_counter()
    inputs = fragmented_inputs()
    setup = time.perf_counter() - t
    components = {k: int(__import__("cc3d").connected_components(m.crop(), return_N=True)[1])
                  for k, m in inputs[0].items() if k in ("portal_vein_and_splenic_vein", "duodenum")}
    return {"setup_s": round(setup, 1), "components": components,
            **{k: round(v, 2) for k, v in rule_stage(*inputs).items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. main) to run the same stage with")
    parser.add_argument("--limit", type=int, default=600, help="seconds before a run is stopped")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker()))
        return
    codes = {"ours": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    for label, code in codes.items():
        env = {**os.environ, "PYTHONPATH": str(code)}
        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker"], env=env,
                                  capture_output=True, text=True, timeout=args.limit)
        except subprocess.TimeoutExpired:
            print(f"{label}: not finished after {time.perf_counter() - t:.0f} s (stopped)")
            continue
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        shares = ", ".join(f"{r['total_s'] / s:.1%} of the {m} sliding window ({s:.0f} s)"
                           for m, s in SLIDING_WINDOW_S.items())
        print(f"{label}: {json.dumps(r)}\n  rule stage {r['total_s']:.1f} s = {shares}")


if __name__ == "__main__":
    main()
