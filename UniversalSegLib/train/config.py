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

Unknown keys are errors (a typo would otherwise be silently ignored). Each section is a pydantic
model whose fields say what they must be, so a refused value is one line naming the field:
`config: train.lr: must be a positive number, got 'abc'`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from UniversalSegLib.config_file import read_config_file, typed, validate_section
from UniversalSegLib.errors import UniversalSegError
from UniversalSegLib.store import Preprocessing
from UniversalSegLib.text import DEFAULT_ENCODER_ID

AMP_MODES = ("auto", "off", "fp16", "bf16")
SCHEDULERS = ("cosine", "constant")
SAMPLINGS = ("uniform", "sqrt")

PositiveInt = typed(int, "a positive integer", gt=0)
NonNegativeInt = typed(int, "a non-negative integer", ge=0)
PositiveFloat = typed(float, "a positive number", gt=0)
NonNegativeFloat = typed(float, "a number >= 0", ge=0)
Fraction = typed(float, "a number in [0, 1]", ge=0, le=1)
OpenFraction = typed(float, "a number in [0, 1)", ge=0, lt=1)
Flag = typed(bool, "true or false")
Text = typed(str, "text")


def one_of(*choices: str) -> Any:
    return typed(Literal[choices], f"one of {', '.join(choices)}")


class _Section(BaseModel):
    """A config section: unknown keys are errors (a typo would otherwise be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    """The architecture of the model to train."""

    classes: typed(list[str], "a non-empty list of class keys", min_length=1)
    backbone: Text = "segresnet"
    backbone_config: typed(dict[str, Any], "a mapping of the backbone's arguments") = Field(default_factory=dict)
    text_encoder: Text = DEFAULT_ENCODER_ID
    lpg: Text = "per_class"
    lpg_hidden: PositiveInt = 512
    description: Text = ""
    license: Text = "Apache-2.0"
    version: Text = "0.1.0"


class TrainSettings(_Section):
    """How to train. `steps` (optimiser steps) wins over `epochs` x steps per epoch."""

    steps: PositiveInt | None = None
    epochs: PositiveInt | None = None
    samples_per_epoch: PositiveInt = 500  # patches per epoch over all ranks
    batch_size: PositiveInt = 2  # patches per rank per optimiser step
    lr: PositiveFloat = 1e-4
    weight_decay: NonNegativeFloat = 1e-5
    warmup_steps: NonNegativeInt = 0
    scheduler: one_of(*SCHEDULERS) = "cosine"
    min_lr_ratio: Fraction = 0.0  # cosine floor as a fraction of lr
    grad_clip: PositiveFloat | None = 12.0  # max gradient L2 norm; null disables clipping
    amp: one_of(*AMP_MODES) = "auto"  # auto: bf16 (or fp16 + grad scaling) on CUDA, off on CPU
    sampling: one_of(*SAMPLINGS) = "uniform"  # uniform over datasets | sqrt: case weight 1/sqrt(dataset size)
    accumulate_per_dataset: Flag = True  # one forward/backward per dataset in the batch, one step
    micro_batch: NonNegativeInt = 0  # at most this many patches per forward/backward (0: no limit)
    val_every: NonNegativeInt = 0  # steps between validations (held-out cases: dataset `split`); 0: at the end
    val_overlap: OpenFraction = 0.25
    nsd_tolerance_mm: PositiveFloat = 2.0
    checkpoint_every: NonNegativeInt = 100
    keep_checkpoints: PositiveInt = 2  # most recent checkpoints kept
    keep_checkpoint_every: NonNegativeInt = 0  # also keep every checkpoint whose step is a multiple of this
    num_workers: NonNegativeInt = 2
    seed: NonNegativeInt = 0
    device: typed(str, "auto, cpu, cuda or cuda:N", pattern=r"^(auto|cpu|mps|cuda)(:\d+)?$") = "auto"
    cache_dir: Text | None = None  # preprocessing cache (default: <output>/cache)
    export: Flag = False  # also install the final model into the user model folder
    progress: Flag = True
    bce_weight: NonNegativeFloat = 1.0
    dice_weight: NonNegativeFloat = 1.0
    dice_smooth: PositiveFloat = 1e-5

    def total_steps(self, world_size: int = 1) -> int:
        if self.steps is not None:
            return self.steps
        return (self.epochs or 1) * self.steps_per_epoch(world_size)

    def steps_per_epoch(self, world_size: int = 1) -> int:
        return max(1, self.samples_per_epoch // (self.batch_size * world_size))


# The `preprocessing` section is the model file's own typed schema (store/manifest.py): same fields,
# defaults and one-line errors, and it becomes the model's `Preprocessing` as it is.
PreprocessingSection = Preprocessing


class ConfigFile(_Section):
    """The whole file, as written (paths not yet resolved)."""

    name: typed(str, "a non-empty name without slashes", pattern=r"^[^/\\]*[^\s/\\][^/\\]*$")
    output: Text | None = None
    model: ModelSection
    preprocessing: PreprocessingSection = Field(default_factory=PreprocessingSection)
    datasets: typed(list[dict[str, Any]], "a non-empty list of dataset entries", min_length=1)
    train: TrainSettings = Field(default_factory=TrainSettings)


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
        return {"name": self.name, "output": str(self.output), "model": self.model.model_dump(),
                "preprocessing": self.preprocessing.model_dump(), "datasets": self.datasets,
                "train": self.train.model_dump()}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UniversalSegError(f"config: {message}")


def _validate_model(m: ModelSection) -> ModelSection:
    """What the types cannot say: classes known to the registry and listed once, known backbone and LPG."""
    from UniversalSegLib.model import BACKBONES
    from UniversalSegLib.model.universal import LPG_VARIANTS
    from UniversalSegLib.registry import default_registry

    registry = default_registry()
    keys = [registry.resolve(str(c)).key for c in m.classes]  # UnknownClassError names the bad one
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    _check(not dupes, f"model.classes: lists {', '.join(dupes)} more than once")
    _check(m.backbone in BACKBONES, f"model.backbone: must be one of {', '.join(sorted(BACKBONES))}, "
                                    f"got {m.backbone!r}")
    _check(m.lpg in LPG_VARIANTS, f"model.lpg: must be one of {', '.join(LPG_VARIANTS)}, got {m.lpg!r}")
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
        raise UniversalSegError(f"config: model.backbone_config: does not build a {m.backbone} "
                                f"({detail}), got {m.backbone_config}") from None
    bad = [s for s in patch_size if s % model.patch_multiple]
    _check(not bad, f"preprocessing.patch_size: must be divisible by {model.patch_multiple} for backbone "
                    f"{m.backbone}, got {list(patch_size)}")


def parse_config(data: dict[str, Any], base_dir: str | Path = ".") -> RunConfig:
    """Validate a config mapping; relative paths are taken relative to `base_dir`."""
    file = validate_section(ConfigFile, data, "", UniversalSegError, prefix="config: ")
    name, base = file.name, Path(base_dir).resolve()
    preprocessing = file.preprocessing
    model = _validate_model(file.model)
    _check_architecture(model, preprocessing.patch_size)
    output = Path(file.output or f"runs/{name}").expanduser()
    output = output if output.is_absolute() else (base / output).resolve()
    return RunConfig(name=name, output=output, model=model, preprocessing=preprocessing, datasets=file.datasets,
                     train=file.train, base_dir=base, raw=data)


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
