"""One training run from a config: datasets -> preprocessing cache -> model -> Trainer -> model file.

The same function serves a single process (CPU or one GPU) and every rank of a `torchrun` job:
rank 0 fills the preprocessing cache while the others wait, every rank builds the same model
(DDP then broadcasts rank 0's weights), and only rank 0 writes logs, checkpoints and the model.

A config with `stages` runs them in order, each in `<output>/stages/<name>/` (a run folder of its
own) starting from the previous stage's model; `--resume` skips the finished ones and continues the
interrupted one from its last checkpoint. An `average` stage interpolates the previous stage's
weights with an earlier stage's (train/average.py). The last stage's model is `<output>/model`.
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
from UniversalSegLib.store import load_model, save_model, user_model_dir
from UniversalSegLib.train.config import RunConfig, Stage, TrainSettings, class_key
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


def check_coverage(config: RunConfig, specs: list, train_classes: list[str] | None = None) -> None:
    """Every class that trains must be annotated by some training dataset, or its head would never learn.

    Args:
        train_classes: the run's (or stage's) `train.train_classes`; without, every model class trains.
    """
    annotated = {k for spec in specs if spec.train_cases() for k in spec.classes}
    trained = config.model.classes if not train_classes else [class_key(n) for n in train_classes]
    missing = [k for k in trained if k not in annotated]
    if missing:
        where = "train.train_classes" if train_classes else "model.classes"
        raise UniversalSegError(f"no training dataset annotates class(es) {', '.join(missing)}; "
                                f"add a dataset that does or remove them from {where}")


def stage_specs(specs: list, stage: Stage | None) -> list:
    """The dataset specs a stage trains on (`stages[i].datasets`; all without)."""
    if stage is None or stage.datasets is None:
        return specs
    return [s for s in specs if s.name in stage.datasets]


def build_data(config: RunConfig, info: DistInfo, settings: TrainSettings | None = None,
               specs: list | None = None) -> tuple[Any, Any, list]:
    """(training PatchDataset, validation cases, dataset specs); rank 0 fills the cache first.

    Args:
        settings: the run's (or stage's) train settings on this device (default: `config.train`).
        specs: the dataset specs to use (default: all of the config's).
    """
    from UniversalSegLib.data import build_training_dataset, build_validation_cases, load_dataset_specs

    t = settings or config.train
    if specs is None:
        specs = load_dataset_specs(config.datasets, config.base_dir)
    check_coverage(config, specs, t.train_classes)
    keys, pre = config.model.classes, config.preprocessing
    generalise = t.augment == "generalise"  # the pipeline runs on the device; the loader only crops
    train_data = val_cases = None
    for turn in ("main", "others"):  # the main rank prepares the cache; the others then only read it
        if (turn == "main") == info.is_main:
            prepare = info.is_main
            train_data = build_training_dataset(specs, keys, pre, config.cache_dir, sampling=t.sampling,
                                                patch_size=t.patch_size, samples_per_epoch=t.samples_per_epoch,
                                                seed=t.seed, transforms=False if generalise else None,
                                                fg_fraction=t.foreground_ratio, structure_maps=generalise,
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


def provenance(config: RunConfig, specs: list, data_hashes: bool = True,
               settings: TrainSettings | None = None) -> dict[str, Any]:
    """What the model was trained on and how, recorded in its manifest.

    Args:
        data_hashes: record each dataset's SHA-256 (reads every file once; only the rank that writes
            the model needs it).
        settings: the train settings used (default: `config.train`).
    """
    settings = settings or config.train
    return {
        "recipe": config.name,
        "config_sha256": config.config_hash(),
        "datasets": [{"name": s.name, "format": s.format, "classes": list(s.classes),
                      "training_cases": len(s.train_cases()), "held_out_cases": len(s.val_cases()),
                      **({"sha256": s.content_sha256()} if data_hashes else {})}  # `universalseg info` shows it
                     for s in specs],
        "train": {k: v for k, v in settings.model_dump().items()
                  if k not in ("device", "progress", "cache_dir", "cpu")},
    }


def _stage_record(stage: Stage, settings: TrainSettings, device: torch.device, specs: list) -> dict[str, Any]:
    """The `provenance.stages` entry of a trained stage."""
    record = {"stage": stage.name, **({"version": stage.version} if stage.version else {}),
              "augment": settings.augment, "steps": settings.total_steps(), "lr": settings.lr,
              "patch_size": settings.patch_size, "batch_size": settings.batch_size,
              "exclusion_weight": settings.exclusion_weight, "exclusion_classes": settings.exclusion_classes,
              "datasets": [s.name for s in specs], "device": str(device)}
    if settings.train_classes:  # what trained and how decides the weights as much as the steps do
        record["train_classes"] = list(settings.train_classes)
    if not settings.dice_on_empty:
        record["dice_on_empty"] = False
    if settings.augment == "generalise":
        record["generalise"] = stage.generalise.model_dump()
    return record


def _generalisation_pipeline(config: RunConfig, settings: TrainSettings, stage: Stage | None):
    """`data.synth.build_generalisation_pipeline` with the (stage's) `generalise` probabilities."""
    from UniversalSegLib.data.synth import build_generalisation_pipeline

    probabilities = (stage.generalise if stage else config.generalise).model_dump()
    return build_generalisation_pipeline(spacing_mm=config.preprocessing.spacing, class_keys=config.model.classes,
                                         seed=settings.seed, **probabilities)


def _initial_weights(model: torch.nn.Module, manifest, init: Path) -> dict[str, str]:
    """Start from `init`'s weights (the previous stage's model: same classes, same architecture);
    returns the provenance's `refined_from` (name, version and hashes, as `store.lineage` reads them)."""
    start = load_model(init)
    if start.manifest.class_keys != manifest.class_keys or start.manifest.backbone_config != manifest.backbone_config:
        raise UniversalSegError(f"{init} has other classes or another architecture than the config's model")
    model.load_state_dict({k: v.float() for k, v in start.model.state_dict().items()})
    earlier = start.manifest.provenance
    manifest.provenance["stages"] = list(earlier.get("stages", []))
    # the data behind the starting weights stays on record (this stage may train on fewer sources)
    mine = {d.get("name"): d for d in manifest.provenance.get("datasets", [])}
    before = [d for d in earlier.get("datasets") or earlier.get("training_data") or [] if isinstance(d, dict)]
    names = {d.get("name") for d in before}
    manifest.provenance["datasets"] = [mine.get(d.get("name"), d) for d in before] + \
        [d for name, d in mine.items() if name not in names]
    manifest.version = start.manifest.version  # a stage naming no version refines the previous one's
    m = start.manifest
    return {"name": m.name, "version": m.version, "weights_sha256": m.weights_sha256,
            "integrity_sha256": m.integrity_sha256}


def _train(config: RunConfig, info: DistInfo, device: torch.device, output: Path, resume: bool,
           stage: Stage | None = None, init: Path | None = None, specs: list | None = None) -> Path:
    """Train one run (or one stage) into `output`; returns its model folder."""
    from UniversalSegLib.data import load_dataset_specs

    settings = config.settings(device.type, stage)
    torch.manual_seed(settings.seed)  # identical initial weights on every rank
    specs = stage_specs(specs if specs is not None else load_dataset_specs(config.datasets, config.base_dir), stage)
    train_data, val_cases, specs = build_data(config, info, settings, specs)
    model, manifest = build_model(config)
    manifest.provenance = provenance(config, specs, data_hashes=info.is_main, settings=settings)
    if init is not None:
        manifest.provenance["refined_from"] = _initial_weights(model, manifest, init)
    if stage is not None:
        manifest.version = stage.version or manifest.version
        manifest.provenance["stages"] = [*manifest.provenance.get("stages", []),
                                         _stage_record(stage, settings, device, specs)]
    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.resolved.json").write_text(_json({**config.to_dict(), "train": settings.model_dump()}))
    transform = _generalisation_pipeline(config, settings, stage) if settings.augment == "generalise" else None
    trainer = Trainer(model, manifest, train_data, settings, output, device=device, dist_info=info,
                      val_cases=val_cases, datasets=[s.name for s in specs if s.train_cases()],
                      batch_transform=transform, weights_dtype=config.model.weights_dtype)
    if resume and not trainer.resume():
        _say(info, "no checkpoint to resume from: starting from step 0")
    elif resume:
        _say(info, f"resuming at step {trainer.step} of {trainer.total_steps}")
    trainer.fit()
    return output / FINAL_MODEL_DIR


def _run_stages(config: RunConfig, info: DistInfo, device: torch.device, resume: bool) -> Path:
    """Each stage in its own folder, from the previous stage's model; the last one's is copied to
    `<output>/model`."""
    from UniversalSegLib.data import load_dataset_specs
    from UniversalSegLib.train.average import average_models

    specs = load_dataset_specs(config.datasets, config.base_dir)
    folders = {s.name: config.output / "stages" / s.name for s in config.stages}
    previous: Path | None = None
    for stage in config.stages:
        model_dir = folders[stage.name] / FINAL_MODEL_DIR
        if resume and (model_dir / "manifest.json").is_file():
            _say(info, f"stage {stage.name}: finished earlier ({model_dir})")
        elif stage.average is not None:
            a = stage.average
            if info.is_main:
                average_models(previous, folders[a.parent] / FINAL_MODEL_DIR, a.parent_weight, stage.version,
                               model_dir, weights_dtype=config.model.weights_dtype, stage=stage.name)
            _say(info, f"stage {stage.name}: {1 - a.parent_weight:g} x the previous stage + "
                       f"{a.parent_weight:g} x stage {a.parent}")
            barrier()
        else:
            _say(info, f"stage {stage.name}: {folders[stage.name]}")
            _train(config, info, device, folders[stage.name], resume, stage, stage.init or previous, specs)
        previous = model_dir
    final = config.output / FINAL_MODEL_DIR
    if info.is_main:
        last = load_model(previous)
        save_model(last.model, last.manifest, final, overwrite=True, weights_dtype=config.model.weights_dtype)
    barrier()
    return final


def run_training(config: RunConfig, resume: bool = False) -> Path:
    """Train per `config`, every stage in order; returns the final model folder.

    Args:
        config: the checked run configuration (`train.config.load_config`).
        resume: continue from the last checkpoint of the current stage; finished stages are skipped.
    """
    info = dist_info_from_env()
    device = resolve_device(config.settings("cuda").device, info)
    init_distributed(info, device)
    try:
        _say(info, f"training {config.name} on {device} x {info.world_size} process(es); run folder {config.output}")
        if config.stages:
            final = _run_stages(config, info, device, resume)
        else:
            final = _train(config, info, device, config.output, resume)
        if info.is_main and config.train.export:
            exported = save_model(*_loaded(final), user_model_dir() / config.name, overwrite=True)
            _say(info, f"installed as model '{config.name}' in {exported}")
        barrier()
        return final
    finally:
        shutdown_distributed()


def check_run(config: RunConfig, device_type: str | None = None) -> list[str]:
    """`universalseg train --check`: the config, its datasets and stages checked without reading any
    image; returns a short summary (one line each)."""
    from UniversalSegLib.data import load_dataset_specs

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    specs = load_dataset_specs(config.datasets, config.base_dir)
    lines = [f"{config.name}: {len(config.model.classes)} classes, backbone {config.model.backbone}, "
             f"settings as on {device_type}"]
    lines += [f"  dataset {s.name} ({s.format}): {len(s.train_cases())} training, {len(s.val_cases())} held-out "
              f"case(s), {len(s.classes)} classes" for s in specs]
    for stage in config.stages or [None]:
        chosen = stage_specs(specs, stage)
        if stage is not None and stage.average is not None:
            a = stage.average
            lines.append(f"  stage {stage.name}: average with {a.parent_weight:g} x stage {a.parent}")
            continue
        t = config.settings(device_type, stage)
        check_coverage(config, chosen, t.train_classes)
        lines.append(f"  {'stage ' + stage.name if stage else 'run'}: {t.total_steps()} steps, lr {t.lr:g}, "
                     f"batch {t.batch_size}, patch {t.patch_size or config.preprocessing.patch_size}, "
                     f"augment {t.augment}, exclusion {t.exclusion_weight:g}")
    return lines


def _loaded(folder: Path) -> tuple:
    model = load_model(folder)
    return model.model, model.manifest


def _json(data: dict) -> str:
    import json

    return json.dumps(data, indent=1, default=str)
