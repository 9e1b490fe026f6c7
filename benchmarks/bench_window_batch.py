"""Windows per backbone call on CPU (`predict(sw_batch_size=N)`): CPU time and masks against 1 window per call.

Each batch size runs `predict` (bundled model, sample CT, all classes, default precision) in a fresh
process, interleaved round by round; printed: predict's wall and CPU seconds, VmHWM, and per class
the Dice of the masks against batch size 1 (the smallest, and every class below 0.999).

    OMP_NUM_THREADS=1 ONEDNN_MAX_CPU_ISA=AVX512_CORE python benchmarks/bench_window_batch.py --batches 1 2 4
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


def worker(batch: int, out: str) -> None:
    import torch

    from UniversalSegLib.inference.predict import predict

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t, c = time.perf_counter(), time.process_time()
    result = predict(str(SAMPLE), device="cpu", sw_batch_size=batch)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    np.savez_compressed(out, **{k: result[k].mask for k in result.keys})
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    print(json.dumps({"wall": wall, "cpu": cpu, "vmhwm_mb": hwm / 1024}))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(a & b) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(int(args.worker[0]), args.worker[1])
        return
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    batches = sorted(set(args.batches) | {1})
    runs: dict[int, list[dict]] = {b: [] for b in batches}
    with tempfile.TemporaryDirectory(prefix="bench_window_batch_") as tmp:
        print("| windows per call | wall (s) | CPU (s) | VmHWM (MB) |")
        print("|---|---|---|---|")
        for _ in range(args.repeat):
            for b in batches:
                out = os.path.join(tmp, f"{b}.npz")
                proc = subprocess.run([sys.executable, __file__, "--worker", str(b), out], env=env,
                                      capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(proc.stderr[-3000:])
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[b].append(r)
                print(f"| {b} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['vmhwm_mb']:.0f} |")
        reference = np.load(os.path.join(tmp, "1.npz"))
        for b in batches[1:]:
            masks = np.load(os.path.join(tmp, f"{b}.npz"))
            scores = {k: dice(masks[k], reference[k]) for k in reference.files}
            low = {k: round(v, 4) for k, v in scores.items() if v < 0.999}
            ratio = min(r["cpu"] for r in runs[1]) / min(r["cpu"] for r in runs[b])
            print(f"batch {b}: {ratio:.2f}x less CPU than 1 (best); Dice vs batch 1: min {min(scores.values()):.4f}, "
                  f"identical classes {sum(np.array_equal(masks[k], reference[k]) for k in reference.files)}"
                  f"/{len(scores)}, below 0.999: {low or 'none'}")


if __name__ == "__main__":
    main()
