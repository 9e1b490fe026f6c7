"""`--classes liver` against all classes: time, windows and the liver's agreement, measured in one run.

Cases, each `predict` in a fresh process (the bundled model on the sample CT, CPU, default precision),
interleaved round by round so the ratios share the machine's load:

  all          all 46 classes (full grid of windows)
  subset       `classes="liver"` with class-subset windows (`inference/roi.py`, the default)
  subset_full  `classes="liver"` on the full grid (`subset_windows=False`)

Printed per run: predict's wall and CPU seconds (the process's own CPU time during `predict`,
steadier than wall time on a shared machine), the windows run, the ROI, the process's VmHWM; then the
best-of ratios and the Dice of the liver of `subset` against `all`'s and `subset_full`'s.

    OMP_NUM_THREADS=1 python benchmarks/bench_subset.py --repeat 2
    OMP_NUM_THREADS=1 python benchmarks/bench_subset.py --shift 8 16   # the model's own window-placement noise

`--shift N`: how much the class's mask moves on the full grid alone when every window sits N voxels
elsewhere (the volume padded by N voxels of 0 in front on each axis, as a slightly larger field of
view would): Dice of the largest component at the threshold, shifted against unshifted. A subset run's
windows are re-tiled over its ROI, so this is the scale its difference from the full run is read on.
    ONEDNN_MAX_CPU_ISA=AVX512_CORE OMP_NUM_THREADS=1 python benchmarks/bench_subset.py --classes spleen
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "UniversalSegLib" / "resources" / "sample" / "ct_abdomen.nii.gz"
CASES = ("all", "subset", "subset_full")


def worker(case: str, classes: str, image: str, out: str) -> None:
    """One prediction; the requested class's mask to `out`.npy and the figures as a JSON line."""
    import torch

    from UniversalSegLib.inference.predict import predict

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t, c = time.perf_counter(), time.process_time()
    result = predict(image, classes=None if case == "all" else classes, device="cpu",
                     subset_windows=case == "subset")
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    np.save(out, result[classes].mask)
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    meta = result.metadata
    print(json.dumps({"wall": wall, "cpu": cpu, "vmhwm_mb": hwm / 1024, "windows": meta.get("windows", "full grid"),
                      "roi": meta.get("window_roi"), "inference_s": meta["inference_s"]}))


def shift_noise(classes: str, image: str, shifts: list[int]) -> None:
    """Print the Dice of the class's full-grid mask with windows moved by each shift against unmoved."""
    import cc3d
    import SimpleITK as sitk
    import torch

    from UniversalSegLib.inference.predict import load_for_inference
    from UniversalSegLib.inference.preprocess import preprocess
    from UniversalSegLib.inference.sliding_window import class_probabilities

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    loaded = load_for_inference(None, "cpu")
    pre = loaded.manifest.preprocessing
    volume = preprocess(sitk.ReadImage(image), pre).volume
    index = [loaded.manifest.class_keys.index(loaded.manifest.registry().resolve(classes).key)]

    def mask(shift: int) -> np.ndarray:
        padded = np.pad(volume, [(shift, 0)] * 3)
        with torch.inference_mode():
            (_, probability), = class_probabilities(loaded.model, padded, index, pre.patch_size, pre.overlap,
                                                    torch.device("cpu"), amp=False)
        return cc3d.largest_k(probability[shift:, shift:, shift:] > pre.threshold, k=1) > 0

    unshifted = mask(0)
    for shift in shifts:
        print(f"{classes}, windows moved by {shift} voxels on every axis: Dice {dice(mask(shift), unshifted):.4f}")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="liver", help="the one class asked for (default: liver)")
    parser.add_argument("--image", default=str(SAMPLE))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--shift", type=int, nargs="+", help="only measure the window-placement noise")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.classes, args.image, args.worker[1])
        return
    if args.shift:
        shift_noise(args.classes, args.image, args.shift)
        return
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs: dict[str, list[dict]] = {c: [] for c in CASES}
    masks: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="bench_subset_") as tmp:
        print(f"{args.classes} vs all classes on {Path(args.image).name}; OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS', '(unset)')}, ONEDNN_MAX_CPU_ISA="
              f"{os.environ.get('ONEDNN_MAX_CPU_ISA', '(all)')}")
        print("| case | wall (s) | CPU (s) | windows | ROI (model grid) | VmHWM (MB) |")
        print("|---|---|---|---|---|---|")
        for _ in range(args.repeat):
            for case in CASES:
                out = os.path.join(tmp, f"{case}.npy")
                proc = subprocess.run([sys.executable, __file__, "--classes", args.classes, "--image", args.image,
                                       "--worker", case, out], env=env, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(proc.stderr[-3000:])
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[case].append(r)
                masks[case] = np.load(out)
                print(f"| {case} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['windows']} | {r['roi']} | "
                      f"{r['vmhwm_mb']:.0f} |")
    best = {c: (min(r["wall"] for r in runs[c]), min(r["cpu"] for r in runs[c])) for c in CASES}
    print(f"all / subset, best of {args.repeat}: {best['all'][1] / best['subset'][1]:.2f}x CPU, "
          f"{best['all'][0] / best['subset'][0]:.2f}x wall; subset_full / subset: "
          f"{best['subset_full'][1] / best['subset'][1]:.2f}x CPU")
    print(f"Dice of {args.classes}: subset vs all {dice(masks['subset'], masks['all']):.4f}, subset vs subset_full "
          f"{dice(masks['subset'], masks['subset_full']):.4f}, subset_full vs all "
          f"{dice(masks['subset_full'], masks['all']):.4f}; voxels subset {np.count_nonzero(masks['subset'])}, "
          f"all {np.count_nonzero(masks['all'])}")


if __name__ == "__main__":
    main()
