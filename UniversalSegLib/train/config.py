"""The training config (YAML or JSON): schema, defaults and validation with one-line errors.

    name: my-model                     # model name (also the folder name when exported)
    output: runs/my-model              # run folder (relative paths are relative to the config file)
    model:
      backbone: segresnet              # any name in model.BACKBONES
      backbone_config: {init_filters: 16}
      classes: [liver, spleen, ...]    # registry keys, names or synonyms, in the model's order
      text_encoder: minilm:all-MiniLM-L6-v2
      lpg: per_class                   # per_class | shared
      lpg_hidden: 512
    preprocessing: {spacing: [1.5, 1.5, 1.5], hu_window: [-175, 250], patch_size: [96, 96, 96]}
    datasets: [...]                    # dataset entries, see data.spec.load_dataset_specs
    train: {steps: 1000, batch_size: 2, ...}   # TrainSettings; every field optional

Unknown keys are errors (a typo would otherwise be silently ignored).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from UniversalSegLib.config_file import read_config_file
from UniversalSegLib.errors import UniversalSegError
from UniversalSegLib.store import Preprocessing
from UniversalSegLib.text import DEFAULT_ENCODER_ID

AMP_MODES = ("auto", "off", "fp16", "bf16")
SCHEDULERS = ("cosine", "constant")
SAMPLINGS = ("uniform", "sqrt")


@dataclass
class ModelSection:
    """The architecture of the model to train."""

    classes: list[str]
    backbone: str = "segresnet"
    backbone_config: dict[str, Any] = field(default_factory=dict)
    text_encoder: str = DEFAULT_ENCODER_ID
    lpg: str = "per_class"
    lpg_hidden: int = 512
    description: str = ""
    license: str = "Apache-2.0"
    version: str = "0.1.0"


@dataclass
class TrainSettings:
    """How to train. `steps` (optimiser steps) wins over `epochs` x steps per epoch."""

    steps: int | None = None
    epochs: int | None = None
    samples_per_epoch: int = 500  # patches per epoch over all ranks
    batch_size: int = 2  # patches per rank per optimiser step
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_steps: int = 0
    scheduler: str = "cosine"
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float | None = 12.0  # max gradient L2 norm; null disables clipping
    amp: str = "auto"  # auto: bf16 (or fp16 + grad scaling) on CUDA, off on CPU
    sampling: str = "uniform"  # uniform over datasets | sqrt: case weight 1/sqrt(dataset size)
    accumulate_per_dataset: bool = True  # one forward/backward per dataset in the batch, one step
    micro_batch: int = 0  # at most this many patches per forward/backward (0: no limit)
    val_every: int = 0  # steps between validations (held-out cases: `split` in dataset entries); 0: at the end
    val_overlap: float = 0.25
    nsd_tolerance_mm: float = 2.0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2  # most recent checkpoints kept
    keep_checkpoint_every: int = 0  # also keep every checkpoint whose step is a multiple of this
    num_workers: int = 2
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cache_dir: str | None = None  # preprocessing cache (default: <output>/cache)
    export: bool = False  # also install the final model into the user model folder
    progress: bool = True
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    dice_smooth: float = 1e-5

    def total_steps(self, world_size: int = 1) -> int:
        if self.steps is not None:
            return self.steps
        return (self.epochs or 1) * self.steps_per_epoch(world_size)

    def steps_per_epoch(self, world_size: int = 1) -> int:
        return max(1, self.samples_per_epoch // (self.batch_size * world_size))


@dataclass
class RunConfig:
    """A whole training run, with paths resolved against the config file's folder."""

    name: str
    output: Path
    model: ModelSection
    preprocessing: Preprocessing
    datasets: list[dict[str, Any]]
    train: TrainSettings
    base_dir: Path
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def cache_dir(self) -> Path:
        return self.resolve(self.train.cache_dir) if self.train.cache_dir else self.output / "cache"

    def resolve(self, path: str | Path) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def config_hash(self) -> str:
        """SHA-256 of the config as given (canonical JSON), recorded in the model's provenance."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "output": str(self.output), "model": asdict(self.model),
                "preprocessing": asdict(self.preprocessing), "datasets": self.datasets, "train": asdict(self.train)}


def _section(cls, data: Any, where: str):
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong basic types."""
    if not isinstance(data, dict):
        raise UniversalSegError(f"config: '{where}' must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UniversalSegError(f"config: unknown key(s) in '{where}': {', '.join(unknown)} "
                                f"(known: {', '.join(known)})")
    try:
        return cls(**data)
    except TypeError as e:
        raise UniversalSegError(f"config: '{where}': {e}") from None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UniversalSegError(f"config: {message}")


def _validate_train(t: TrainSettings) -> None:
    def positive_int(name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
        v = getattr(t, name)
        if v is None and allow_none:
            return
        _check(isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if allow_zero else v > 0),
               f"train.{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {v!r}")

    for name in ("steps", "epochs"):
        positive_int(name, allow_none=True)
    for name in ("samples_per_epoch", "batch_size", "keep_checkpoints"):
        positive_int(name)
    for name in ("warmup_steps", "micro_batch", "val_every", "checkpoint_every", "keep_checkpoint_every",
                 "num_workers", "seed"):
        positive_int(name, allow_zero=True)
    _check(isinstance(t.lr, (int, float)) and t.lr > 0, f"train.lr must be a positive number, got {t.lr!r}")
    _check(isinstance(t.weight_decay, (int, float)) and t.weight_decay >= 0, "train.weight_decay must be >= 0")
    _check(t.grad_clip is None or (isinstance(t.grad_clip, (int, float)) and t.grad_clip > 0),
           "train.grad_clip must be a positive number or null")
    _check(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio must lie in [0, 1]")
    _check(0.0 <= t.val_overlap < 1.0, "train.val_overlap must lie in [0, 1)")
    _check(t.nsd_tolerance_mm > 0, "train.nsd_tolerance_mm must be positive")
    _check(t.amp in AMP_MODES, f"train.amp must be one of {', '.join(AMP_MODES)}, got {t.amp!r}")
    _check(t.scheduler in SCHEDULERS, f"train.scheduler must be one of {', '.join(SCHEDULERS)}, got {t.scheduler!r}")
    _check(t.sampling in SAMPLINGS, f"train.sampling must be one of {', '.join(SAMPLINGS)}, got {t.sampling!r}")
    _check(isinstance(t.device, str) and t.device.split(":")[0] in ("auto", "cpu", "cuda", "mps"),
           f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")


def _validate_model(m: ModelSection) -> ModelSection:
    from UniversalSegLib.model import BACKBONES
    from UniversalSegLib.model.universal import LPG_VARIANTS
    from UniversalSegLib.registry import default_registry

    _check(isinstance(m.classes, list) and len(m.classes) > 0, "model.classes must be a non-empty list of class keys")
    registry = default_registry()
    keys = [registry.resolve(str(c)).key for c in m.classes]  # UnknownClassError names the bad one
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    _check(not dupes, f"model.classes lists {', '.join(dupes)} more than once")
    _check(m.backbone in BACKBONES, f"unknown model.backbone {m.backbone!r}; known: {', '.join(sorted(BACKBONES))}")
    _check(isinstance(m.backbone_config, dict), "model.backbone_config must be a mapping")
    _check(m.lpg in LPG_VARIANTS, f"model.lpg must be one of {', '.join(LPG_VARIANTS)}, got {m.lpg!r}")
    _check(isinstance(m.lpg_hidden, int) and m.lpg_hidden > 0, "model.lpg_hidden must be a positive integer")
    m.classes = keys
    return m


def _check_architecture(m: ModelSection, patch_size: list[int]) -> None:
    """Build the model once without weights, so a backbone_config the network refuses (an unknown
    argument, channels GroupNorm cannot split) or a patch size it cannot take is a one-line error
    here, before any data is read, instead of a traceback from deep inside MONAI."""
    import torch

    from UniversalSegLib.model.universal import UniversalModel

    def build(device: str) -> UniversalModel:
        with torch.device(device):
            return UniversalModel(m.backbone, m.backbone_config, torch.zeros(len(m.classes), 1), lpg=m.lpg,
                                  lpg_hidden=m.lpg_hidden)

    try:
        try:
            model = build("meta")  # no weights allocated
        except (RuntimeError, NotImplementedError):  # networks that read values while built (Swin's .item())
            model = build("cpu")
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise UniversalSegError(f"config: model.backbone_config {m.backbone_config} does not build a "
                                f"{m.backbone}: {detail}") from None
    bad = [s for s in patch_size if s % model.patch_multiple]
    _check(not bad, f"preprocessing.patch_size {list(patch_size)} must be divisible by {model.patch_multiple} "
                    f"for backbone {m.backbone}")


def _validate_preprocessing(p: Preprocessing) -> None:
    _check(len(p.spacing) == 3 and all(float(s) > 0 for s in p.spacing),
           f"preprocessing.spacing must be three positive numbers (mm), got {p.spacing!r}")
    _check(len(p.hu_window) == 2 and float(p.hu_window[0]) < float(p.hu_window[1]),
           f"preprocessing.hu_window must be [low, high] with low < high, got {p.hu_window!r}")
    _check(len(p.patch_size) == 3 and all(isinstance(s, int) and s > 0 for s in p.patch_size),
           f"preprocessing.patch_size must be three positive integers, got {p.patch_size!r}")


def parse_config(data: dict[str, Any], base_dir: str | Path = ".") -> RunConfig:
    """Validate a config mapping; relative paths are taken relative to `base_dir`."""
    _check(isinstance(data, dict), "the config must be a mapping at the top level")
    top = {"name", "output", "model", "preprocessing", "datasets", "train"}
    unknown = sorted(set(data) - top)
    _check(not unknown, f"unknown top-level key(s): {', '.join(unknown)} (known: {', '.join(sorted(top))})")
    for key in ("name", "model", "datasets"):
        _check(key in data, f"missing required key '{key}'")
    name = data["name"]
    _check(isinstance(name, str) and name.strip() != "" and "/" not in name and "\\" not in name,
           f"name must be a non-empty string without slashes, got {name!r}")
    base = Path(base_dir).resolve()
    preprocessing = _section(Preprocessing, data.get("preprocessing", {}), "preprocessing")
    _validate_preprocessing(preprocessing)
    model = _validate_model(_section(ModelSection, data["model"], "model"))
    _check_architecture(model, preprocessing.patch_size)
    train = _section(TrainSettings, data.get("train", {}), "train")
    _validate_train(train)
    datasets = data["datasets"]
    _check(isinstance(datasets, list) and len(datasets) > 0, "datasets must be a non-empty list")
    output = Path(data.get("output") or f"runs/{name}").expanduser()
    output = output if output.is_absolute() else (base / output).resolve()
    return RunConfig(name=name, output=output, model=model, preprocessing=preprocessing, datasets=datasets,
                     train=train, base_dir=base, raw=data)


def load_config(path: str | Path, train_overrides: dict[str, Any] | None = None,
                output: str | Path | None = None) -> RunConfig:
    """Read a YAML or JSON config file; `train_overrides` replace fields of `train`, `output` the run folder."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UniversalSegError(f"config file {path} not found")
    try:
        data = read_config_file(path)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UniversalSegError(f"{path}: unreadable config ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict):
        if train_overrides:
            data = {**data, "train": {**(data.get("train") or {}), **train_overrides}}
        if output is not None:
            data = {**data, "output": str(Path(output).expanduser().resolve())}
    return parse_config(data, path.parent)
