"""Parameter counts and CPU forward time of each backbone with Universal Model heads.

    python benchmarks/bench_model.py [--threads 2] [--classes 32] [--embed-dim 512] [--size 96]

Prints a markdown table: parameters (backbone, heads), and the median of 3 forward passes on one
(1, 1, size^3) patch after a warm-up, next to the backbone alone (the baseline the heads add to).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from UniversalSegLib.model import BACKBONES, UniversalModel

CONFIGS = {"segresnet": {"init_filters": 16}, "swinunetr": {"feature_size": 48}, "unet_genesis": {}}


def timed(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--classes", type=int, default=32)
    ap.add_argument("--embed-dim", type=int, default=512)
    ap.add_argument("--size", type=int, default=96)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(1, 1, args.size, args.size, args.size)
    print("| backbone | LPG | params total | backbone | heads+LPG | forward (s) | backbone only (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, cfg in CONFIGS.items():
        if name not in BACKBONES:
            continue
        for lpg in ("per_class", "shared"):
            model = UniversalModel(name, cfg, torch.randn(args.classes, args.embed_dim), lpg=lpg).eval()
            total = sum(p.numel() for p in model.parameters())
            backbone = sum(p.numel() for p in model.backbone.parameters())
            with torch.no_grad():
                full = timed(lambda m=model: m(x))
                bare = timed(lambda m=model: m.backbone(x))
            print(f"| {name} | {lpg} | {total / 1e6:.2f} M | {backbone / 1e6:.2f} M | {(total - backbone) / 1e6:.2f} M "
                  f"| {full:.2f} | {bare:.2f} |", flush=True)
    print(f"\n{args.classes} classes, {args.embed_dim}-d embeddings, {args.size}^3 patch, {args.threads} CPU threads")


if __name__ == "__main__":
    main()
