"""Benchmark: one training step of the bundled default model's recipe on the CPU, and what each of
the CPU measures buys, side by side in one run.

The real step of `training/default_model/train.py` (patch sampling, the `generalise` augmentation
pipeline, forward, partial-label loss, backward, AdamW) on the prepared bundle, with batch 2 of
64^3 patches (the recipe's `train.cpu` profile). Each variant runs in a fresh process, because
the allocator setting is process-wide:

  baseline      float32, glibc's default allocator behaviour, heads of all 46 classes
  +heap         + `runtime.retain_freed_memory()` (no page-fault churn between steps)
  +bf16         + bfloat16 autocast (only on CPUs with native bf16: AVX512-BF16/AMX)
  +annotated    + only the heads of classes some patch of the batch annotates (the recipe)

    python training/default_model/prepare.py                       # once: build/bundle.npz
    OMP_NUM_THREADS=2 python benchmarks/bench_default_model_cpu.py [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, checkout_env, require_checkout  # benchmarks/_common.py (this script's folder)

RECIPE_DIR = REPO / "training" / "default_model"
VARIANTS = {"baseline": set(), "+heap": {"heap"}, "+bf16": {"heap", "bf16"},
            "+annotated": {"heap", "bf16", "annotated"}}


def worker(options: set[str], steps: int, warmup: int) -> dict:
    require_checkout()
    import torch
    import yaml

    from training.default_model import train as recipe_train  # a namespace import: REPO is on PYTHONPATH
    from UniversalSegLib.data.synth import build_generalisation_pipeline
    from UniversalSegLib.inference.sliding_window import cpu_has_native_bf16
    from UniversalSegLib.runtime import retain_freed_memory
    from UniversalSegLib.store import build_model
    from UniversalSegLib.train.losses import PartialLabelLoss

    if "heap" in options:
        retain_freed_memory()
    bf16 = "bf16" in options and cpu_has_native_bf16()
    recipe = yaml.safe_load((RECIPE_DIR / "recipe.yaml").read_text())
    cfg = recipe_train.training_settings(recipe, torch.device("cpu"))
    bundle = recipe_train.Bundle(RECIPE_DIR / "build" / "bundle.npz", torch.device("cpu"))
    pipeline = build_generalisation_pipeline(spacing_mm=recipe["preprocessing"]["spacing"],
                                             class_keys=bundle.class_keys, seed=0, **recipe.get("generalise", {}))
    model = build_model(recipe_train.make_manifest(recipe, bundle, steps), bundle.embeddings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn, gen = PartialLabelLoss(), torch.Generator().manual_seed(0)
    k = len(bundle.class_keys)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        samples = [recipe_train.sample_patch(bundle, bundle.sources[(2 * step + i) % len(bundle.sources)],
                                             cfg["patch"], 0.67, gen, k, spatial_augment=False)
                   for i in range(cfg["batch_size"])]
        batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
        with torch.no_grad():
            batch = pipeline(batch)
        classes = batch["annotated"].any(0).nonzero()[:, 0] if "annotated" in options else torch.arange(k)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch["image"], classes)
        loss = loss_fn(logits.float(), batch["label"][:, classes], batch["annotated"][:, classes]).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    usage = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
             if line.startswith("VmHWM")}
    return {"s_per_step": round(sum(times) / len(times), 3), "bf16": bf16, "peak_rss_mb": usage["VmHWM"] // 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(VARIANTS[args.worker], args.steps, args.warmup)))
        return
    if not (RECIPE_DIR / "build" / "bundle.npz").exists():
        sys.exit("run `python training/default_model/prepare.py` first (it builds build/bundle.npz)")
    rows = {}
    for name in VARIANTS:
        run = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(args.steps),
                              "--warmup", str(args.warmup)], capture_output=True, text=True, env=checkout_env())
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
