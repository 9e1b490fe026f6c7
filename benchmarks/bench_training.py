"""Benchmark: training throughput and peak memory, and how peak memory grows with the number of
datasets in one optimiser step: per-dataset gradient accumulation vs one growing batch.

Each measurement runs in a fresh process (peak RSS only ever grows within a process), through the
real `Trainer.train_step` (masked partial-label loss, AdamW, clipping, AMP on CUDA) on synthetic
partially labelled patches. One optimiser step holds one patch from each of N datasets, each
dataset annotating its own `--classes-per-dataset` classes:
  accumulate  one forward/backward per dataset, then one optimiser step (UMedPT)
  batch       all N patches in one forward/backward (the batch grows with N)

    OMP_NUM_THREADS=2 python benchmarks/bench_training.py                       # CPU, 48^3 patches
    python benchmarks/bench_training.py --device cuda --patch 96 --amp auto     # GPU
Peak memory: CUDA max_memory_allocated on a GPU; on the CPU the peak resident set size (RSS), as
the rise over the process's RSS just before the measured steps and as the absolute peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import checkout_env, require_checkout  # benchmarks/_common.py (this script's folder)

require_checkout()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def measure(args: argparse.Namespace, datasets: int, accumulate: bool) -> dict:
    """One configuration in this process: warm-up steps, then timed steps."""
    import psutil
    import torch

    from Testing.support import SyntheticPartialDataset, tiny_model
    from UniversalSegLib.registry import default_registry
    from UniversalSegLib.train.config import TrainSettings
    from UniversalSegLib.train.loop import Trainer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    per = args.classes_per_dataset
    keys = default_registry().keys[: datasets * per]
    model, manifest = tiny_model(keys, lpg_hidden=args.lpg_hidden, patch_size=(args.patch,) * 3)
    if args.backbone_config:
        from UniversalSegLib.model import UniversalModel

        manifest.backbone_config = json.loads(args.backbone_config)
        model = UniversalModel("segresnet", manifest.backbone_config, model.class_embeddings,
                               lpg_hidden=args.lpg_hidden)
    spec = {f"d{i}": list(range(i * per, (i + 1) * per)) for i in range(datasets)}
    data = SyntheticPartialDataset(spec, len(keys), (args.patch,) * 3, length=datasets)
    batch = torch.utils.data.default_collate([data[i] for i in range(datasets)])  # one patch per dataset
    settings = TrainSettings(steps=1000, batch_size=datasets, accumulate_per_dataset=accumulate, amp=args.amp,
                             num_workers=0, progress=False)
    trainer = Trainer(model, manifest, data, settings, Path(args.scratch) / "run", device=device)
    for _ in range(args.warmup):
        trainer.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = psutil.Process().memory_info().rss / 2**20
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    result = {"datasets": datasets, "mode": "accumulate" if accumulate else "batch", "patch": args.patch,
              "patches_per_s": datasets * args.steps / seconds, "s_per_step": seconds / args.steps}
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_rss_mb"] = _peak_rss_mb()
        result["step_rise_mb"] = result["peak_rss_mb"] - rss_before
    return result


def run_isolated(args: argparse.Namespace, datasets: int, accumulate: bool) -> dict:
    cmd = [sys.executable, __file__, "--one", str(datasets), "accumulate" if accumulate else "batch",
           *sys.argv[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=checkout_env())
    if proc.returncode != 0:
        raise SystemExit(f"measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--patch", type=int, default=48, help="cubic patch edge in voxels")
    ap.add_argument("--datasets", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--classes-per-dataset", type=int, default=2)
    ap.add_argument("--lpg-hidden", type=int, default=64)
    ap.add_argument("--backbone-config", default='{"init_filters": 16, "blocks_down": [1, 2, 2, 4], '
                                                '"blocks_up": [1, 1, 1]}', help="segresnet config as JSON")
    ap.add_argument("--amp", default="auto", choices=("auto", "off", "fp16", "bf16"))
    ap.add_argument("--steps", type=int, default=3, help="timed optimiser steps per configuration")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--scratch", default="/tmp/universalseg-bench-training")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    ap.add_argument("--one", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args, int(args.one[0]), args.one[1] == "accumulate")))
        return 0

    key = "peak_mb" if args.device.startswith("cuda") else "step_rise_mb"
    what = "CUDA max_memory_allocated" if key == "peak_mb" else "peak RSS rise during the steps"
    print(f"device {args.device}, {args.threads} threads, patch {args.patch}^3, segresnet {args.backbone_config}, "
          f"{args.classes_per_dataset} classes per dataset, one patch per dataset per step, amp {args.amp}")
    print(f"{'datasets':>8} {'mode':>11} {'patches/s':>10} {'s/step':>8} {what + ' (MB)':>34}"
          + ("" if key == "peak_mb" else f" {'peak RSS (MB)':>14}"))
    rows = []
    for n in args.datasets:
        for accumulate in (True, False):
            r = run_isolated(args, n, accumulate)
            rows.append(r)
            extra = "" if key == "peak_mb" else f" {r['peak_rss_mb']:14.0f}"
            print(f"{n:8d} {r['mode']:>11} {r['patches_per_s']:10.2f} {r['s_per_step']:8.2f} {r[key]:34.0f}{extra}",
                  flush=True)
    for mode in ("accumulate", "batch"):
        sel = [r for r in rows if r["mode"] == mode]
        if len(sel) > 1:
            lo, hi = sel[0], sel[-1]
            print(f"{mode:>11}: peak memory x{hi[key] / lo[key]:.2f} from {lo['datasets']} to {hi['datasets']} "
                  f"datasets ({lo[key]:.0f} -> {hi[key]:.0f} MB)")
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
