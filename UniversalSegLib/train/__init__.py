"""Training: the masked partial-label loss, the loop (AdamW, warm-up + cosine, AMP, DDP),
pickle-free checkpoints with exact resume, validation Dice/NSD, logs and the config schema.

Imported lazily: `from UniversalSegLib.train import Trainer` loads torch and MONAI only then.
"""

from __future__ import annotations

from UniversalSegLib._lazy import lazy_getattr

_LAZY = {
    "PartialLabelLoss": "UniversalSegLib.train.losses",
    "Trainer": "UniversalSegLib.train.loop",
    "lr_factor": "UniversalSegLib.train.loop",
    "RunConfig": "UniversalSegLib.train.config",
    "TrainSettings": "UniversalSegLib.train.config",
    "load_config": "UniversalSegLib.train.config",
    "parse_config": "UniversalSegLib.train.config",
    "run_training": "UniversalSegLib.train.run",
    "save_checkpoint": "UniversalSegLib.train.checkpoint",
    "load_checkpoint": "UniversalSegLib.train.checkpoint",
    "latest_checkpoint": "UniversalSegLib.train.checkpoint",
    "validate": "UniversalSegLib.train.validation",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


def train(config_path, resume: bool = False, **train_overrides):
    """Train from a config file (the Python twin of `universalseg train`); returns the model folder."""
    from UniversalSegLib.train.config import load_config
    from UniversalSegLib.train.run import run_training

    return run_training(load_config(config_path, train_overrides=train_overrides or None), resume=resume)


__all__ = [*_LAZY, "train"]
