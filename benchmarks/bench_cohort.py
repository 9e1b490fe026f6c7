"""Cohort throughput: `universalseg cohort` over N small CTs against N separate `universalseg predict` calls.

Both run as fresh processes on the same N crops of the real small abdominal CT (ct_small, cropped
to 60 x 60 x 20 voxels at varied positions), the bundled model, the same classes and formats, so
the difference is what the cohort mode amortises: interpreter start-up, imports and model loading
once instead of N times (and the next case read while the current one is computed). Then the
per-case time on the sample CT (all classes, default settings, model already loaded), the figure
a large cohort's cost follows, and what 10,000 such cases take on this machine.

    python benchmarks/bench_cohort.py                      # 20 cases, liver + spleen, this CPU
    python benchmarks/bench_cohort.py --cases 5 --device cuda
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, checkout_env, require_checkout  # benchmarks/_common.py (this script's folder)

require_checkout()
SMALL_CT = REPO / "Testing" / "data" / "shared" / "ct-abdomen" / "ct_small.nii.gz"
SAMPLE = REPO / "UniversalSegLib" / "resources" / "sample" / "ct_abdomen.nii.gz"


def make_cases(folder: Path, n: int) -> list[Path]:
    """`n` 60 x 60 x 20 crops of the small CT, each at its own position."""
    import SimpleITK as sitk

    ct = sitk.ReadImage(str(SMALL_CT))
    sx, sy, sz = ct.GetSize()
    paths = []
    for i in range(n):
        x, y, z = (i * 7) % (sx - 60), (i * 11) % (sy - 60), (i * 3) % (sz - 20)
        path = folder / f"case{i:03d}.nii.gz"
        sitk.WriteImage(ct[x:x + 60, y:y + 60, z:z + 20], str(path))
        paths.append(path)
    return paths


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of `universalseg ARGS` in a fresh process."""
    env = checkout_env()
    start, cpu = time.perf_counter(), _children_cpu_s()
    done = subprocess.run([sys.executable, "-m", "UniversalSegLib", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start, _children_cpu_s() - cpu


def per_case_on_sample(device: str) -> tuple[float, float]:
    """(wall, CPU seconds) of one `predict` of the sample CT with the model loaded beforehand (as in a cohort)."""
    import SimpleITK as sitk

    from UniversalSegLib.inference.predict import load_for_inference, predict

    model = load_for_inference(None, device)
    image = sitk.ReadImage(str(SAMPLE))
    start, cpu = time.perf_counter(), time.process_time()
    predict(image, model=model, device=device)
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--classes", nargs="+", default=["liver", "spleen"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-sample", action="store_true", help="leave out the per-case time on the sample CT")
    args = parser.parse_args()
    import torch

    common = ["--classes", *args.classes, "--device", args.device, "--formats", "seg.nrrd,stats"]
    print(f"{args.cases} cases of 60x60x20 voxels (3 mm), classes {' '.join(args.classes)}, device {args.device}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the start", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cases"
        folder.mkdir()
        cases = make_cases(folder, args.cases)
        cohort = run(["cohort", str(folder), "-o", str(Path(tmp) / "cohort"), *common])
        calls = [run(["predict", str(c), "-o", str(Path(tmp) / "single" / c.name), *common]) for c in cases]
        separate = (sum(w for w, _ in calls), sum(c for _, c in calls))
    for name, (wall, cpu) in (("cohort mode (1 process)", cohort), (f"{args.cases} separate CLI calls", separate)):
        print(f"{name:28s} wall {wall:7.1f} s {args.cases / wall * 3600:7.0f} cases/hour | "
              f"CPU {cpu:7.1f} s {args.cases / cpu * 3600:7.0f} cases per CPU-hour")
    print(f"cohort mode / separate calls: {separate[0] / cohort[0]:.2f}x the cases per hour (wall), "
          f"{separate[1] / cohort[1]:.2f}x per CPU-hour; load average {os.getloadavg()[0]:.1f} at the end")
    if args.skip_sample:
        return
    wall, cpu = per_case_on_sample(args.device)
    print(f"sample CT (ct_abdomen.nii.gz, all classes, default settings), model loaded: {wall:.1f} s wall, "
          f"{cpu:.1f} s CPU per case")
    print(f"10,000 such cases: {10_000 * wall / 3600:.0f} hours of one such process at this wall time, "
          f"{10_000 * cpu / 3600:.0f} CPU-hours")


if __name__ == "__main__":
    main()
