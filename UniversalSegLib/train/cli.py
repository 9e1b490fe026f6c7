"""`universalseg train CONFIG`: the sub-command's arguments; the work is in train.run.

Kept free of heavy imports: the CLI builds every sub-parser on each start.
"""

from __future__ import annotations

import argparse
import os


def _cmd_train(args: argparse.Namespace) -> int:
    from UniversalSegLib.device import resolve_device
    from UniversalSegLib.runtime import retain_freed_memory
    from UniversalSegLib.train.config import load_config
    from UniversalSegLib.train.run import run_training

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
    if resolve_device(config.train.device).type == "cpu":
        retain_freed_memory()  # no page-fault churn between steps: ~2x faster CPU steps (see runtime.py)
    final = run_training(config, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the whole job
        print(final)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train` to the `universalseg` sub-commands."""
    p = sub.add_parser("train", help="train a model on partially labelled datasets (YAML/JSON config)",
                       description="Train a Universal Model from a config file; for several GPUs run "
                                   "`torchrun --nproc_per_node N -m UniversalSegLib train CONFIG`.")
    p.add_argument("config", help="training config (.yaml, .yml or .json); see training/README.md")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--output", default=None, help="run folder (overrides the config's `output`)")
    p.add_argument("--steps", type=int, default=None, help="total optimiser steps (overrides train.steps)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (overrides train.device)")
    p.add_argument("--export", action="store_true", help="also install the final model in the user model folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs of batch jobs)")
    p.set_defaults(func=_cmd_train)
