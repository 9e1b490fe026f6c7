"""Benchmark: extend a model with aorta_true_lumen and aorta_false_lumen from the angiogram case, on CPU.

Prints the extension time (data + head warm-up + pseudo-labels + training; the scoring and the naive
baseline are timed separately) and the parameters added per class. The acceptance target is under
15 minutes on 2 CPU cores with the bundled default model:

    OMP_NUM_THREADS=2 python benchmarks/bench_extend.py --model universalseg-demo --threads 2
    python benchmarks/bench_extend.py --tiny          # a tiny random base model: checks the pipeline end to end

The angiogram (../shared/data/ct-thorax-aorta: one CT and its lumen masks) is split along the
patient's long axis: the inferior 30% of its slices are held out for the Dice report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, require_checkout  # benchmarks/_common.py (this script's folder)

require_checkout()
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ct-thorax-aorta"
NEW = ["aorta_true_lumen:Aorta true lumen", "aorta_false_lumen:Aorta false lumen"]
TINY_CLASSES = ["aorta", "heart", "liver", "spleen", "kidney_left", "kidney_right", "vertebrae_T12", "vertebrae_L1"]


def tiny_base(folder: Path) -> Path:
    """A random segresnet base model (3 mm, 64^3 patches): exercises every stage in little time."""
    import torch

    from UniversalSegLib.store import Preprocessing, create_model, save_model

    torch.manual_seed(0)
    model, manifest = create_model("tiny-random-base", TINY_CLASSES, lpg_hidden=64,
                                   backbone_config={"init_filters": 16, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
                                   preprocessing=Preprocessing(spacing=[3.0] * 3, patch_size=[64] * 3))
    return save_model(model, manifest, folder / "tiny-random-base")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="universalseg-demo", help="base model name or folder")
    ap.add_argument("--tiny", action="store_true", help="use a tiny random base model instead of --model")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--train", default="heads+decoder", choices=("heads", "heads+decoder", "all"))
    ap.add_argument("--init", default="auto", choices=("auto", "similar", "fresh"))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--time-budget", type=float, default=None, help="training seconds")
    ap.add_argument("--patch-size", type=int, nargs=3, default=None)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--naive", action="store_true", help="also train the naive baseline (not part of the time)")
    ap.add_argument("--retention", action="store_true", help="score retention on the bundled sample CT")
    ap.add_argument("--report", default=None, help="write the JSON report here")
    args = ap.parse_args()

    import torch

    from UniversalSegLib.continual import extend_model
    from UniversalSegLib.continual.command import parse_new_class
    from UniversalSegLib.progress import stage_lines

    torch.set_num_threads(args.threads)
    if not Path(args.data).exists():
        print(f"data not found: {args.data}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        base = tiny_base(Path(tmp)) if args.tiny else args.model
        t0 = time.perf_counter()
        report = extend_model(base, [parse_new_class(t, "vessel", ["aorta"], []) for t in NEW], args.data,
                              Path(tmp) / "extended", train=args.train, init=args.init, steps=args.steps,
                              warmup_heads_steps=args.warmup_steps, time_budget_s=args.time_budget,
                              patch_size=args.patch_size, naive_baseline=args.naive,
                              retention_images=["sample"] if args.retention else [], device=args.device,
                              progress=stage_lines())
        wall = time.perf_counter() - t0
    t = report.timing_s
    print(f"base model: {report.parent['name']} ({'tiny random' if args.tiny else args.model}); "
          f"device {args.device}, {args.threads} threads; train={args.train}, init={args.init}")
    print(f"extension time: {t['extension']:.1f} s  (data {t['data']:.1f}, head warm-up {t['warmup']:.1f}, "
          f"pseudo-labels {t.get('pseudo_labels', 0):.1f}, training {t.get('train', 0):.1f}; "
          f"{report.settings['steps_done']} steps after {report.settings['warmup_steps_done']} warm-up steps)")
    print(f"scoring {t['evaluation']:.1f} s, naive baseline {t.get('naive_baseline', 0):.1f} s, wall {wall:.1f} s")
    print(f"parameters added per class: {report.parameters['per_class']:,} "
          f"(+ a {report.parameters['embedding_per_class']}-d text embedding, stored as a buffer)")
    for key, sel in report.init_selection.items():
        if isinstance(sel, dict):
            print(f"init {key}: similar ({sel['similar_to']}) Dice {sel['similar']['dice']:.3f} "
                  f"vs fresh {sel['fresh']['dice']:.3f} after warm-up -> {sel['chosen']}")
    print(report.summary())
    if args.report:
        Path(args.report).write_text(json.dumps({**report.to_dict(), "benchmark_wall_s": wall}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
