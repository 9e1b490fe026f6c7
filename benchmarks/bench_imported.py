"""Time and peak memory of our pipeline with an imported CLIP-Driven Universal Model, on CPU.

A model of the published architecture is written in the published checkpoint layout (random
weights: speed and memory do not depend on the values), imported with the code behind
`universalseg import-checkpoint`, and run by `UniversalSegLib.inference.predict.predict` on the
bundled sample CT resampled to 0.8 x 0.8 x 1.5 mm (a clinical grid, ~457 x 379 x 224 voxels),
all 32 classes, in a fresh process limited to `--threads` threads. Peak memory is that process's
peak resident set size. The reference implementation's figures for the same job on 2 cores are
printed beside ours.

    python benchmarks/bench_imported.py [--backbone unet|swinunetr|both] [--threads 2]
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

SAMPLE_CT = REPO / "UniversalSegLib" / "resources" / "sample" / "ct_abdomen.nii.gz"
CLINICAL_SPACING = (0.8, 0.8, 1.5)
# The reference implementation on one clinical CT, 2 CPU cores (issue 7): ~20 minutes, ~9 GB.
REFERENCE_SECONDS = 20 * 60
REFERENCE_PEAK_GB = 9.0


def resample_sample(out: Path, spacing: tuple[float, ...] = CLINICAL_SPACING) -> tuple[int, ...]:
    """The bundled 3 mm sample CT on a finer, clinical grid (linear, int16 HU like a scanner's file)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(SAMPLE_CT))
    size = [round(n * s / t) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    resampled = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                              image.GetDirection(), -1024.0, sitk.sitkInt16)
    sitk.WriteImage(resampled, str(out))
    return tuple(size)


def make_imported_model(backbone: str, folder: Path) -> tuple[Path, float, int]:
    """Published-layout checkpoint with random weights -> our model file. Returns (path, import s, bytes)."""
    import torch

    from Testing.support import published_layout
    from UniversalSegLib.importers.clip_driven_universal import build_imported_model, import_checkpoint

    torch.manual_seed(0)
    model = build_imported_model(backbone)
    model.class_embeddings.normal_()  # distinct classes (zeros would make all 32 heads identical)
    ckpt = folder / f"clip_driven_universal_{backbone}.pth"
    torch.save({"net": published_layout(model.state_dict(), backbone), "epoch": 0}, ckpt)
    t = time.perf_counter()
    path = import_checkpoint(ckpt, backbone, output_dir=folder / "models")
    return path, time.perf_counter() - t, ckpt.stat().st_size


def child(model: str, image: str, threads: int, fast: bool) -> None:
    """Runs in a fresh process: one prediction, then a JSON line with time and peak RSS."""
    import torch

    torch.set_num_threads(threads)
    from UniversalSegLib import runtime
    from UniversalSegLib.inference.predict import predict

    runtime.tune_for_command("predict")  # the allocator setting `universalseg predict` makes (cli.main)
    t = time.perf_counter()
    result = predict(image, model=model, classes=None, device="cpu", fast=fast)
    seconds = time.perf_counter() - t
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # VmHWM: this process's own peak (ru_maxrss may carry the parent's size over fork + exec).
    peak_kib = next((int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                     if line.startswith("VmHWM:")), usage.ru_maxrss)
    meta = {k: round(v, 1) if k.endswith("_s") else v for k, v in result.metadata.items()
            if k.endswith("_s") or k in ("model_grid_size", "overlap", "mixed_precision")}
    print(json.dumps({"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                      "peak_gb": peak_kib / 2**20, "metadata": meta}))


def run_child(model: Path, image: Path, threads: int, fast: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, __file__, "--child", str(model), str(image), "--threads", str(threads)]
                          + (["--fast"] if fast else []),
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"prediction failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", choices=["unet", "swinunetr", "both"], default="both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spacing", type=float, nargs=3, default=CLINICAL_SPACING,
                        help="grid of the test CT in mm (default: %(default)s; e.g. 3 3 3 for a quick smoke run)")
    parser.add_argument("--modes", nargs="+", choices=["default", "fast"], default=["default", "fast"],
                        help="default: the published settings (overlap 0.5, float32 on CPU); fast: --fast")
    parser.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)  # the child's mode
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "IMAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.threads, args.fast)
        return
    try:
        import UniversalSegLib.inference.predict  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"the inference pipeline is not available yet ({e})") from None

    backbones = ["unet", "swinunetr"] if args.backbone == "both" else [args.backbone]
    with tempfile.TemporaryDirectory(prefix="bench_imported_") as tmp:
        folder = Path(tmp)
        image = folder / "ct_0.8x0.8x1.5mm.nii.gz"
        size = resample_sample(image, tuple(args.spacing))
        print(f"input: bundled sample CT resampled to {tuple(args.spacing)} mm, {size[0]}x{size[1]}x{size[2]} voxels; "
              f"CPU, {args.threads} threads, all 32 classes")
        print(f"{'backbone':18} {'import':>8} {'predict':>9} {'peak RSS':>9}   reference (2 cores)   speed-up  memory")
        for backbone in backbones:
            model, import_s, ckpt_bytes = make_imported_model(backbone, folder)
            for mode in args.modes:
                result = run_child(model, image, args.threads, mode == "fast")
                report(f"{backbone} {mode}", import_s, ckpt_bytes, result, args.threads)


def report(label: str, import_s: float, ckpt_bytes: int, r: dict, threads: int) -> None:
    print(f"{label:18} {import_s:7.1f}s {r['seconds'] / 60:7.1f}min {r['peak_gb']:7.2f}GB   "
          f"~{REFERENCE_SECONDS / 60:.0f} min, ~{REFERENCE_PEAK_GB:.0f} GB       "
          f"{REFERENCE_SECONDS / r['seconds']:5.1f}x  {REFERENCE_PEAK_GB / r['peak_gb']:5.1f}x less")
    print(f"{'':18} checkpoint {ckpt_bytes / 2**20:.0f} MiB; CPU time {r['cpu_seconds'] / 60:.1f} min "
          f"(= {r['cpu_seconds'] / 60 / threads:.1f} min of wall time on {threads} free cores); "
          f"stages: {json.dumps(r['metadata'])}", flush=True)


if __name__ == "__main__":
    main()
