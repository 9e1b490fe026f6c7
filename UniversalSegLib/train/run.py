"""One training run from a config: datasets -> preprocessing cache -> model -> Trainer -> model file.

The same function serves a single process (CPU or one GPU) and every rank of a `torchrun` job:
rank 0 fills the preprocessing cache while the others wait, every rank builds the same model
(DDP then broadcasts rank 0's weights), and only rank 0 writes logs, checkpoints and the model.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch

from UniversalSegLib.device import resolve_device
from UniversalSegLib.errors import UniversalSegError
from UniversalSegLib.progress import CountBar
from UniversalSegLib.store import save_model, user_model_dir
from UniversalSegLib.train.config import RunConfig
from UniversalSegLib.train.distributed import (
    DistInfo,
    barrier,
    dist_info_from_env,
    init_distributed,
    shutdown_distributed,
)
from UniversalSegLib.train.loop import FINAL_MODEL_DIR, Trainer

log = logging.getLogger("UniversalSegLib.train")


def _say(info: DistInfo, message: str) -> None:
    if info.is_main:
        print(message, file=sys.stderr, flush=True)


def _cache_progress(info: DistInfo, what: str) -> CountBar | None:
    return CountBar(f"preprocessing {what}") if info.is_main else None


def check_coverage(config: RunConfig, specs: list) -> None:
    """Every model class must be annotated by some training dataset, or its head would never learn."""
    annotated = {k for spec in specs if spec.train_cases() for k in spec.classes}
    missing = [k for k in config.model.classes if k not in annotated]
    if missing:
        raise UniversalSegError(f"no training dataset annotates class(es) {', '.join(missing)}; "
                                "add a dataset that does or remove them from model.classes")


def build_data(config: RunConfig, info: DistInfo) -> tuple[Any, Any, list]:
    """(training PatchDataset, validation cases, dataset specs); rank 0 fills the cache first."""
    from UniversalSegLib.data import build_training_dataset, build_validation_cases, load_dataset_specs

    specs = load_dataset_specs(config.datasets, config.base_dir)
    check_coverage(config, specs)
    keys, pre, t = config.model.classes, config.preprocessing, config.train
    train_data = val_cases = None
    for turn in ("main", "others"):  # the main rank prepares the cache; the others then only read it
        if (turn == "main") == info.is_main:
            prepare = info.is_main
            train_data = build_training_dataset(specs, keys, pre, config.cache_dir, sampling=t.sampling,
                                                samples_per_epoch=t.samples_per_epoch, seed=t.seed,
                                                prepare=prepare, workers=t.num_workers,
                                                progress=_cache_progress(info, "training cases"))
            val_cases = build_validation_cases(specs, keys, pre, config.cache_dir, "val", prepare=prepare,
                                               workers=t.num_workers,
                                               progress=_cache_progress(info, "validation cases"))
        barrier()
    return train_data, val_cases, specs


def build_model(config: RunConfig):
    """A fresh model for the config's classes (text prompts embedded once with its encoder)."""
    from UniversalSegLib.store import create_model
    from UniversalSegLib.text import get_text_encoder

    m = config.model
    model, manifest = create_model(config.name, m.classes, backbone=m.backbone, backbone_config=m.backbone_config,
                                   text_encoder=get_text_encoder(m.text_encoder), lpg=m.lpg, lpg_hidden=m.lpg_hidden,
                                   preprocessing=config.preprocessing, description=m.description,
                                   license=m.license, version=m.version)
    return model, manifest  # parse_config has checked that the architecture builds for the patch size


def provenance(config: RunConfig, specs: list, data_hashes: bool = True) -> dict[str, Any]:
    """What the model was trained on and how, recorded in its manifest.

    Args:
        data_hashes: record each dataset's SHA-256 (reads every file once; only the rank that writes
            the model needs it).
    """
    return {
        "recipe": config.name,
        "config_sha256": config.config_hash(),
        "datasets": [{"name": s.name, "format": s.format, "classes": list(s.classes),
                      "training_cases": len(s.train_cases()), "held_out_cases": len(s.val_cases()),
                      **({"sha256": s.content_sha256()} if data_hashes else {})}  # `universalseg info` shows it
                     for s in specs],
        "train": {k: v for k, v in config.train.model_dump().items() if k not in ("device", "progress", "cache_dir")},
    }


def run_training(config: RunConfig, resume: bool = False) -> Path:
    """Train per `config` (continuing its last checkpoint if `resume`); returns the final model folder."""
    info = dist_info_from_env()
    device = resolve_device(config.train.device, info)
    init_distributed(info, device)
    try:
        torch.manual_seed(config.train.seed)  # identical initial weights on every rank
        _say(info, f"training {config.name} on {device} x {info.world_size} process(es); run folder {config.output}")
        train_data, val_cases, specs = build_data(config, info)
        model, manifest = build_model(config)
        manifest.provenance = provenance(config, specs, data_hashes=info.is_main)
        if info.is_main:
            config.output.mkdir(parents=True, exist_ok=True)
            (config.output / "config.resolved.json").write_text(_json(config.to_dict()))
        trainer = Trainer(model, manifest, train_data, config.train, config.output, device=device, dist_info=info,
                          val_cases=val_cases, datasets=[s.name for s in specs if s.train_cases()])
        if resume and not trainer.resume():
            _say(info, "no checkpoint to resume from: starting from step 0")
        elif resume:
            _say(info, f"resuming at step {trainer.step} of {trainer.total_steps}")
        trainer.fit()
        final = config.output / FINAL_MODEL_DIR
        if info.is_main and config.train.export:
            exported = save_model(trainer.model, trainer.manifest, user_model_dir() / config.name, overwrite=True)
            _say(info, f"installed as model '{config.name}' in {exported}")
        barrier()
        return final
    finally:
        shutdown_distributed()


def _json(data: dict) -> str:
    import json

    return json.dumps(data, indent=1, default=str)
