"""Inference speed and memory: UniversalSeg's pipeline vs a plain MONAI baseline, side by side.

Both run the same random-weight model of the real architecture (SegResNet, init_filters 16, 1.5 mm,
96^3 patches, per-class LPG) on the same input with the same preprocessing and post-processing:

- ours: `UniversalSegLib.predict` (float16 class-chunked stitching at the model grid, each class
  resampled to the input grid one at a time, only where it can be foreground; masks kept boxed
  and bit-packed; autocast on CUDA).
- baseline: MONAI `sliding_window_inference` stitching all classes as float32 on the host, sigmoid,
  every class resampled back to the input grid as float32 and kept, then thresholded.

Each measurement runs in a fresh subprocess that reports its own peak RSS (VmHWM) and the time
from reading the input to having every mask (model loading included). "floor" is a process that only
imports, reads the input and loads the model: the part of the peak no pipeline can avoid.

    python benchmarks/bench_inference.py   # sample CT and its 0.8x0.8x1.5 mm version; 32 and 256 classes
    python benchmarks/bench_inference.py --inputs sample --classes 32 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, require_checkout  # benchmarks/_common.py (this script's folder)

require_checkout()
SAMPLE = REPO / "UniversalSegLib" / "resources" / "sample" / "ct_abdomen.nii.gz"
FINE_SPACING = (0.8, 0.8, 1.5)
EMBED_DIM = 512  # CLIP text width; the embeddings of a random model are random anyway


def make_inputs(folder: Path, names: list[str], crop: list[int] | None) -> dict[str, Path]:
    """The sample CT (optionally cropped, (x0 x1 y0 y1 z0 z1) voxels), and it resampled (linear) to 0.8x0.8x1.5 mm."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(SAMPLE))
    if crop:
        image = image[crop[0]:crop[1], crop[2]:crop[3], crop[4]:crop[5]]
    inputs = {"sample": folder / "sample.nii.gz"}
    sitk.WriteImage(image, str(inputs["sample"]))
    if "fine" in names:
        spacing = image.GetSpacing()
        size = [int(round(n * s / f)) for n, s, f in zip(image.GetSize(), spacing, FINE_SPACING)]
        origin = image.TransformContinuousIndexToPhysicalPoint([(f / s - 1) / 2 for s, f in zip(spacing, FINE_SPACING)])
        fine = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin, FINE_SPACING,
                             image.GetDirection(), -1024.0, sitk.sitkInt16)
        inputs["fine"] = folder / "fine_0.8x0.8x1.5.nii.gz"
        sitk.WriteImage(fine, str(inputs["fine"]))
    return inputs


def baseline_bytes(image_path: Path, n_classes: int, spacing: float, patch: int) -> int:
    """Rough peak of the baseline: float32 stitching (+ its sigmoid copy) and float32 volumes at input resolution."""
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(str(image_path))
    model_grid = [max(patch, round(n * s / spacing)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return n_classes * (8 * int(np.prod(model_grid)) + 5 * int(np.prod(image.GetSize())))


def make_model(folder: Path, n_classes: int, init_filters: int, spacing: float, patch: int) -> Path:
    """A random-weight model with the paper's 32 template classes first, then synthetic extra classes."""
    import torch

    from UniversalSegLib.registry import ClassInfo, default_registry
    from UniversalSegLib.store import Manifest, Preprocessing, build_model, save_model

    template = default_registry().template_32()
    extra = [ClassInfo(key=f"extra_{i:03d}", name=f"Extra structure {i}", group="other")
             for i in range(max(0, n_classes - len(template)))]
    classes = (template + extra)[:n_classes]
    manifest = Manifest(name=f"bench-{n_classes}", backbone="segresnet",
                        backbone_config={"init_filters": init_filters}, classes=classes, text_encoder="random",
                        preprocessing=Preprocessing(spacing=[spacing] * 3, patch_size=[patch] * 3))
    torch.manual_seed(n_classes)
    model = build_model(manifest, torch.randn(n_classes, EMBED_DIM))
    return save_model(model, manifest, folder / manifest.name, overwrite=True)


# --- workers (one per subprocess) ------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    """This process's own peak RSS. Linux's ru_maxrss keeps the parent's RSS at fork across exec, so a
    worker spawned by a big driver would report at least the driver's size; VmHWM starts afresh at exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux, bytes on macOS


def run_ours(model: Path, image_path: Path, device: str, sw_batch: int | None) -> dict:
    from UniversalSegLib import predict, runtime

    runtime.tune_for_command("predict")  # the allocator setting `universalseg predict` makes (cli.main)
    result = predict(image_path, model=model, device=device, sw_batch_size=sw_batch)
    return {"counts": [c.voxel_count for c in result.classes], "stages": {
        k: round(v, 2) for k, v in result.metadata.items() if k.endswith("_s")}}


def run_baseline(model: Path, image_path: Path, device: str, sw_batch: int | None) -> dict:
    import numpy as np
    import SimpleITK as sitk
    import torch
    from monai.inferers import sliding_window_inference

    from UniversalSegLib.device import resolve_device
    from UniversalSegLib.inference.masks import BoxMask
    from UniversalSegLib.inference.postprocess import apply_rules, disjoint, disjoint_keys, outside_vessel_keys
    from UniversalSegLib.inference.preprocess import preprocess
    from UniversalSegLib.io import read_image
    from UniversalSegLib.store import load_model

    dev = resolve_device(device)
    image = read_image(image_path)
    loaded = load_model(model, device=dev)
    pre = loaded.manifest.preprocessing
    prepared = preprocess(image, pre)
    batch = sw_batch or (4 if dev.type == "cuda" else 1)
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(prepared.volume)[None, None], pre.patch_size, batch,
                                          loaded.model, overlap=pre.overlap, mode="gaussian", sw_device=dev,
                                          device="cpu")
        probabilities = torch.sigmoid(logits)[0].numpy()  # (classes, x, y, z) float32
    del logits
    restored = np.empty((len(probabilities), *sitk.GetArrayViewFromImage(image).shape), np.float32)
    for i, p in enumerate(probabilities):  # every class back to the input grid, all kept as float32
        restored[i] = sitk.GetArrayFromImage(sitk.Resample(prepared.grid.sub_image(p, (0, 0, 0)), image,
                                                           sitk.Transform(), sitk.sitkLinear, 0.0,
                                                           sitk.sitkFloat32))
    masks = restored > pre.threshold
    infos = {c.key: c for c in loaded.manifest.classes}
    boxed = {k: BoxMask.from_array(m) for k, m in zip(infos, masks)}
    index = {k: i for i, k in enumerate(infos)}
    vessels, organs = disjoint_keys(list(infos.values())), outside_vessel_keys(list(infos.values()))
    values = {k: np.rint(restored[index[k]][masks[index[k]]] * 255).astype(np.uint8) for k in vessels}
    means = {k: float(restored[index[k]][masks[index[k]]].mean()) if masks[index[k]].any() else 0.0 for k in organs}
    final = apply_rules(disjoint(boxed, values, vessels, means), infos, image, pre.spacing)
    return {"counts": [final[k].count for k in infos], "stages": {}}


def run_floor(model: Path, image_path: Path, device: str, sw_batch: int | None) -> dict:
    from UniversalSegLib.device import resolve_device
    from UniversalSegLib.io import read_image
    from UniversalSegLib.store import load_model

    read_image(image_path)
    load_model(model, device=resolve_device(device))
    return {"counts": [], "stages": {}}


WORKERS = {"ours": run_ours, "baseline": run_baseline, "floor": run_floor}


def worker(args: argparse.Namespace) -> None:
    import torch

    import UniversalSegLib.inference.predict  # noqa: F401  (imports outside the timed part, as for every kind)

    start = time.perf_counter()
    out = WORKERS[args.worker](Path(args.model), Path(args.input), args.device, args.sw_batch)
    out["time_s"] = round(time.perf_counter() - start, 2)
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    if torch.cuda.is_available():
        out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out))


# --- driver -----------------------------------------------------------------------------------------------


def measure(kind: str, model: Path, image: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", str(model), "--input", str(image),
           "--device", args.device]
    if args.sw_batch:
        cmd += ["--sw-batch", str(args.sw_batch)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if run.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def best(runs: list[dict]) -> dict:
    """The fastest run's figures, with the largest peak RSS seen (time is noisy, memory is not)."""
    out = dict(min(runs, key=lambda r: r["time_s"]))
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    out["times_s"] = [r["time_s"] for r in runs]
    return out


def disagreement(a: list[int], b: list[int]) -> float:
    """Share of foreground voxels whose count differs between two runs (0 = same mask sizes)."""
    return sum(abs(x - y) for x, y in zip(a, b)) / max(1, sum(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--classes", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--inputs", nargs="+", default=["sample", "fine"], choices=["sample", "fine"])
    parser.add_argument("--sw-batch", type=int, default=None, help="windows per forward (default 4 CUDA, 1 CPU)")
    parser.add_argument("--init-filters", type=int, default=16)
    parser.add_argument("--spacing", type=float, default=1.5)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--crop", type=int, nargs=6, default=None, metavar=("X0", "X1", "Y0", "Y1", "Z0", "Z1"),
                        help="use this voxel box of the sample (for small machines)")
    parser.add_argument("--max-baseline-gb", type=float, default=None,
                        help="skip baseline runs estimated to need more (default: 80%% of available memory)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement at the fewest classes "
                        "(the fastest is shown)")
    parser.add_argument("--workdir", default=None, help="keep models and inputs here (default: a temp folder)")
    parser.add_argument("--json", default=None, help="also write the measurements to this file")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    limit = args.max_baseline_gb * 2**30 if args.max_baseline_gb else 0.8 * _available_bytes()
    with tempfile.TemporaryDirectory(prefix="universalseg-bench-") as tmp:
        work = Path(args.workdir or tmp)
        (work / "models").mkdir(parents=True, exist_ok=True)
        inputs = make_inputs(work, args.inputs, args.crop)
        models = {n: make_model(work / "models", n, args.init_filters, args.spacing, args.patch) for n in args.classes}
        rows = []
        for name in args.inputs:
            for n in args.classes:
                need = baseline_bytes(inputs[name], n, args.spacing, args.patch)
                kinds = ["floor", "ours", "baseline"] if need <= limit else ["floor", "ours"]
                runs: dict[str, list[dict]] = {k: [] for k in kinds}
                for _ in range(args.repeat if n <= min(args.classes) else 1):  # interleaved, against drift
                    for kind in kinds:
                        runs[kind].append(measure(kind, models[n], inputs[name], args))
                m = {kind: best(r) for kind, r in runs.items()}
                m.setdefault("baseline", {"skipped": f"needs ~{need / 2**30:.0f} GB"})
                rows.append({"input": name, "classes": n, **m})
                print(f"# {name} {n} classes: {json.dumps(m)}", file=sys.stderr, flush=True)
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def _available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU x{os.cpu_count()}"
    print(f"\nCommand: python benchmarks/bench_inference.py {' '.join(sys.argv[1:])}  (device: {device}, {name})\n")
    print("| input | classes | ours time (s) | baseline time (s) | speed-up | ours peak RSS (MB) | "
          "baseline peak RSS (MB) | memory ratio | floor RSS (MB) | mask size difference |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ours, base, floor = r["ours"], r["baseline"], r["floor"]
        if "skipped" in base:
            print(f"| {r['input']} | {r['classes']} | {ours['time_s']:.1f} | not run ({base['skipped']}) | | "
                  f"{ours['peak_rss_mb']:.0f} | | | {floor['peak_rss_mb']:.0f} | |")
            continue
        print(f"| {r['input']} | {r['classes']} | {ours['time_s']:.1f} | {base['time_s']:.1f} | "
              f"{base['time_s'] / ours['time_s']:.2f}x | {ours['peak_rss_mb']:.0f} | {base['peak_rss_mb']:.0f} | "
              f"{ours['peak_rss_mb'] / base['peak_rss_mb']:.2f} | {floor['peak_rss_mb']:.0f} | "
              f"{100 * disagreement(ours['counts'], base['counts']):.2f}% |")
    print("\nPer input, our peak RSS at the most classes / at the fewest:")
    for name in dict.fromkeys(r["input"] for r in rows):
        mine = [r for r in rows if r["input"] == name]
        if len(mine) > 1:
            lo, hi = min(mine, key=lambda r: r["classes"]), max(mine, key=lambda r: r["classes"])
            above = [r["ours"]["peak_rss_mb"] - r["floor"]["peak_rss_mb"] for r in (lo, hi)]
            print(f"- {name}: {hi['ours']['peak_rss_mb'] / lo['ours']['peak_rss_mb']:.2f}x "
                  f"({hi['classes']} vs {lo['classes']} classes; above the floor: {above[1]:.0f} vs {above[0]:.0f} MB)")
    for r in rows:
        if r["ours"].get("gpu_peak_mb") is not None and "skipped" not in r["baseline"]:
            print(f"- GPU peak {r['input']} {r['classes']}: ours {r['ours']['gpu_peak_mb']:.0f} MB, "
                  f"baseline {r['baseline']['gpu_peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
