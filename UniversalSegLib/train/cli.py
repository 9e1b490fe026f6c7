"""`universalseg train CONFIG` and `universalseg average`: the sub-commands' arguments; the work is in
train.run and train.average.

Kept free of heavy imports: the CLI builds every sub-parser on each start.
"""

from __future__ import annotations

import argparse
import os


def _cmd_train(args: argparse.Namespace) -> int:
    from UniversalSegLib.device import resolve_device
    from UniversalSegLib.runtime import retain_freed_memory
    from UniversalSegLib.train.config import load_config
    from UniversalSegLib.train.run import check_run, run_training

    overrides = {}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.device is not None:
        overrides["device"] = args.device
    if args.export:
        overrides["export"] = True
    if args.no_progress:
        overrides["progress"] = False
    config = load_config(args.config, train_overrides=overrides, output=args.output)
    if args.check:
        device_type = None if args.device in (None, "auto") else args.device.split(":")[0]
        print("\n".join(check_run(config, device_type)))
        return 0
    if resolve_device(config.settings("cuda").device).type == "cpu":
        retain_freed_memory()  # no page-fault churn between steps: ~2x faster CPU steps (see runtime.py)
    final = run_training(config, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the whole job
        print(final)
    return 0


def _cmd_average(args: argparse.Namespace) -> int:
    from UniversalSegLib.train.average import average_models

    out = average_models(args.refined, args.parent, args.parent_weight, args.version, args.out,
                         weights_dtype=args.weights_dtype)
    print(f"{out}: {1 - args.parent_weight:g} x {args.refined} + {args.parent_weight:g} x {args.parent}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train` and `average` to the `universalseg` sub-commands."""
    p = sub.add_parser("train", help="train a model on partially labelled datasets (YAML/JSON config)",
                       description="Train a Universal Model from a config file; for several GPUs run "
                                   "`torchrun --nproc_per_node N -m UniversalSegLib train CONFIG`.")
    p.add_argument("config", help="training config (.yaml, .yml or .json); see training/README.md")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run folder's last checkpoint (with stages: skip the finished ones)")
    p.add_argument("--check", action="store_true",
                   help="check the config, its datasets and stages, print a summary and exit (trains nothing)")
    p.add_argument("--output", default=None, help="run folder (overrides the config's `output`)")
    p.add_argument("--steps", type=int, default=None,
                   help="total optimiser steps (overrides train.steps, in every stage)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (overrides train.device)")
    p.add_argument("--export", action="store_true", help="also install the final model in the user model folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs of batch jobs)")
    p.set_defaults(func=_cmd_train)

    a = sub.add_parser("average", help="interpolate a refined model's weights with its parent's (WiSE-FT)",
                       description="Write (1 - w) x REFINED + w x PARENT as a new model folder; both models must "
                                   "have the same classes and architecture.")
    a.add_argument("refined", help="the refined model's folder")
    a.add_argument("parent", help="the folder of the model it was refined from")
    a.add_argument("--parent-weight", type=float, required=True, help="the parent's share, 0 to 1")
    a.add_argument("--version", default=None, help="the new model's version (default: the refined model's)")
    a.add_argument("--out", required=True, help="the new model's folder (replaced if it exists)")
    a.add_argument("--weights-dtype", choices=["float16", "float32"], default="float16",
                   help="stored weights (default float16, like the bundled model)")
    a.set_defaults(func=_cmd_average)
