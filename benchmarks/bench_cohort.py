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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
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


def run(args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "UniversalSegLib", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def per_case_on_sample(device: str) -> float:
    """Seconds for one `predict` of the sample CT with a model loaded beforehand (as in a cohort)."""
    import SimpleITK as sitk

    from UniversalSegLib.inference.predict import load_for_inference, predict

    model = load_for_inference(None, device)
    image = sitk.ReadImage(str(SAMPLE))
    start = time.perf_counter()
    predict(image, model=model, device=device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--classes", nargs="+", default=["liver", "spleen"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch

    common = ["--classes", *args.classes, "--device", args.device, "--formats", "seg.nrrd,stats"]
    print(f"{args.cases} cases of 60x60x20 voxels (3 mm), classes {' '.join(args.classes)}, device {args.device}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cases"
        folder.mkdir()
        cases = make_cases(folder, args.cases)
        cohort_s = run(["cohort", str(folder), "-o", str(Path(tmp) / "cohort"), *common])
        separate_s = sum(run(["predict", str(c), "-o", str(Path(tmp) / "single" / c.name), *common]) for c in cases)
    for name, seconds in (("cohort mode (1 process)", cohort_s), (f"{args.cases} separate CLI calls", separate_s)):
        print(f"{name:28s} {seconds:7.1f} s  {args.cases / seconds * 3600:8.0f} cases/hour")
    print(f"cohort mode / separate calls: {separate_s / cohort_s:.2f}x the cases per hour")
    sample_s = per_case_on_sample(args.device)
    print(f"sample CT (ct_abdomen.nii.gz, all classes, default settings), model loaded: {sample_s:.1f} s per case")
    print(f"10,000 such cases: {10_000 * sample_s / 3600:.1f} hours on one such process "
          f"({10_000 * sample_s / 3600 / 8:.1f} h on 8 ranks if they scale linearly)")


if __name__ == "__main__":
    main()
