"""The bundled model's CPU inference time and peak memory at two sliding-window sizes.

Baseline: 96^3 windows (the bundled model's setting up to v0.2.0). Candidate: 64^3 windows, the
patch size its refinement stages were trained at on the CPU. Same input (the bundled sample CT),
same classes (all 46), overlap 0.5; each run in a fresh process that reports its own peak RSS
(VmHWM) and the time from reading the input to having every mask (model loading included).
Dice of liver, spleen and kidneys against the sample's labels shows what each setting gives.

    python benchmarks/bench_window_size.py [--sizes 96 64] [--repeats 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import REPO, checkout_env  # benchmarks/_common.py (this script's folder)

SAMPLE = REPO / "UniversalSegLib" / "resources" / "sample"

CHILD = r"""
import dataclasses, json, sys, time
import SimpleITK as sitk
from experiments.check_generalisation import organ_scores  # cwd: the repository root
from UniversalSegLib.inference.predict import predict
from UniversalSegLib.store import load_model
size, image, labels = int(sys.argv[1]), sys.argv[2], sys.argv[3]
t = time.perf_counter()
model = load_model(None)
model.manifest.preprocessing = model.manifest.preprocessing.model_copy(update={"patch_size": [size] * 3})
result = predict(image, model, device="cpu")
seconds = time.perf_counter() - t
peak_kb = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
print(json.dumps({"seconds": round(seconds, 2), "peak_mb": round(peak_kb / 1024),
                  "dice": {k: round(v, 3) for k, v in organ_scores(result, sitk.ReadImage(labels)).items()}}))
"""


def run_once(size: int, image: Path, labels: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(size), str(image), str(labels)], cwd=REPO,
                         env=checkout_env(), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 64], help="the first is the baseline")
    ap.add_argument("--repeats", type=int, default=2, help="runs per size; the fastest counts")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    image, labels = SAMPLE / "ct_abdomen.nii.gz", SAMPLE / "ct_abdomen_labels_totalsegmentator_v2.nii.gz"
    results = {}
    for size in args.sizes:
        runs = [run_once(size, image, labels) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["seconds"])
        results[size] = {**best, "all_seconds": [r["seconds"] for r in runs]}
        print(f"{size}^3 windows: {best['seconds']:.1f} s, peak {best['peak_mb']} MB, Dice {best['dice']}", flush=True)
    base = results[args.sizes[0]]
    for size in args.sizes[1:]:
        r = results[size]
        print(f"{size}^3 vs {args.sizes[0]}^3: time x{r['seconds'] / base['seconds']:.2f}, "
              f"peak memory x{r['peak_mb'] / base['peak_mb']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
