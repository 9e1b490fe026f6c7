"""Benchmark: one training step of the bundled default model's recipe on the CPU, as `universalseg
train` runs it, and what each of the CPU measures buys, side by side in one run.

The real `Trainer.train_step` of the recipe's stage 2f settings on the CPU (training/default_model/
recipe.yaml: batch 2 of 64^3 patches from the preprocessing cache, the `generalise` pipeline on the
batch, forward, partial-label loss, backward, AdamW), loading the batch included. Each variant runs in
a fresh process, because the allocator setting is process-wide:

  baseline      float32, glibc's default allocator behaviour, no exclusion loss (annotated heads only)
  +heap         + `runtime.retain_freed_memory()` (no page-fault churn between steps)
  +bf16         + bfloat16 autocast (`train.amp: bf16`; only on CPUs with native bf16: AVX512-BF16/AMX)
  +exclusion    + the recipe's exclusion loss on 12 sampled unannotated heads (stage 2f runs all of them)

    OMP_NUM_THREADS=2 python benchmarks/bench_default_model_cpu.py [--steps 8] [--cache DIR]

The first run fills the cache (the recipe's run folder's, by default; about a minute).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, checkout_env, require_checkout  # benchmarks/_common.py (this script's folder)

RECIPE = REPO / "training" / "default_model" / "recipe.yaml"
VARIANTS = {"baseline": set(), "+heap": {"heap"}, "+bf16": {"heap", "bf16"},
            "+exclusion": {"heap", "bf16", "exclusion"}}


def worker(options: set[str], steps: int, warmup: int, cache: str) -> dict:
    require_checkout()
    import torch

    from UniversalSegLib.data import load_dataset_specs
    from UniversalSegLib.inference.sliding_window import cpu_has_native_bf16
    from UniversalSegLib.runtime import retain_freed_memory
    from UniversalSegLib.train.config import load_config
    from UniversalSegLib.train.distributed import DistInfo
    from UniversalSegLib.train.loop import Trainer
    from UniversalSegLib.train.run import _generalisation_pipeline, build_data, build_model, stage_specs

    if "heap" in options:
        retain_freed_memory()
    bf16 = "bf16" in options and cpu_has_native_bf16()
    overrides = {"num_workers": 0, "progress": False, "device": "cpu", "cache_dir": cache,
                 "amp": "bf16" if bf16 else "off", "exclusion_classes": 12,
                 "exclusion_weight": 5.0 if "exclusion" in options else 0.0}
    config = load_config(RECIPE, train_overrides=overrides)
    stage = next(s for s in config.stages if s.name == "2f")
    settings = config.settings("cpu", stage)
    specs = stage_specs(load_dataset_specs(config.datasets, config.base_dir), stage)
    data, _, _ = build_data(config, DistInfo(), settings, specs)
    model, manifest = build_model(config)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, manifest, data, settings, out, batch_transform=_generalisation_pipeline(
            config, settings, stage))
        loader = iter(torch.utils.data.DataLoader(data, batch_size=settings.batch_size, shuffle=False))
        times = []
        for step in range(warmup + steps):
            start = time.perf_counter()
            trainer.train_step(next(loader))
            trainer.step += 1
            if step >= warmup:
                times.append(time.perf_counter() - start)
    usage = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
             if line.startswith("VmHWM")}
    return {"s_per_step": round(sum(times) / len(times), 3), "bf16": bf16, "peak_rss_mb": usage["VmHWM"] // 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cache", default=str(RECIPE.parent / "runs" / "universalseg-demo" / "cache"),
                        help="the preprocessing cache (default: the recipe's run folder's)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(VARIANTS[args.worker], args.steps, args.warmup, args.cache)))
        return
    rows = {}
    for name in VARIANTS:
        run = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(args.steps),
                              "--warmup", str(args.warmup), "--cache", args.cache], capture_output=True, text=True,
                             env=checkout_env())
        if run.returncode != 0:
            sys.exit(f"{name} failed:\n{run.stderr[-3000:]}")
        rows[name] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"# {name}: {rows[name]}", file=sys.stderr, flush=True)
    base = rows["baseline"]["s_per_step"]
    print("| variant | s/step (batch 2 x 64^3) | speed-up vs baseline | bf16 active | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['s_per_step']:.2f} | {base / r['s_per_step']:.2f}x | {r['bf16']} | {r['peak_rss_mb']} |")


if __name__ == "__main__":
    main()
