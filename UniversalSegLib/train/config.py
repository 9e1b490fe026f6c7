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
    train: {steps: 1000, batch_size: 2, ...}   # TrainSettings; every field optional; `cpu:` overrides on CPU
    generalise: {p_synth: 0.3, ...}    # the `augment: generalise` pipeline's probabilities
    stages: [{name: "1", train: {...}}, {name: "2", train: {lr: 1e-4}}, {name: mix, average: {...}}]

Unknown keys are errors (a typo would otherwise be silently ignored). Each section is a pydantic
model whose fields say what they must be, so a refused value is one line naming the field:
`config: train.lr: must be a positive number, got 'abc'`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from UniversalSegLib.config_file import read_config_file, typed, validate_section
from UniversalSegLib.errors import UniversalSegError, UnknownClassError
from UniversalSegLib.store import Preprocessing
from UniversalSegLib.text import DEFAULT_ENCODER_ID

AMP_MODES = ("auto", "off", "fp16", "bf16")
AUGMENTS = ("basic", "generalise")
WEIGHT_DTYPES = ("float32", "float16")
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
    weights_dtype: one_of(*WEIGHT_DTYPES) = "float32"  # of the final model file (float16 halves it)


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
    # false: a class none of whose annotating samples in the batch shows it gets the BCE only (the Dice
    # of an empty target can only push it down, and Adam makes that push full-size: train/losses.py)
    dice_on_empty: Flag = True
    # basic: the loader's MONAI transforms; generalise: the `generalise` section's pipeline, on the device
    augment: one_of(*AUGMENTS) = "basic"
    patch_size: typed(list[typed(int, "positive", gt=0)], "three positive integers", min_length=3,
                      max_length=3) | None = None  # training patch (default: preprocessing.patch_size)
    foreground_ratio: Fraction = 2 / 3  # share of patches centred on an annotated voxel
    exclusion_weight: NonNegativeFloat = 0.0  # train/losses.exclusion_loss: unannotated classes are 0 where
    exclusion_classes: NonNegativeInt = 0  # an unrelated annotated class is; heads sampled per pass (0: all)
    # only these classes' parameter generators train; the backbone, the shared feature heads and every other
    # class stay bit-identical (a fine-tune that cannot change the rest of the model)
    train_classes: typed(list[Text], "a list of the model's class keys", min_length=1) | None = None
    cpu: typed(dict[str, Any], "a mapping of train settings used on the CPU") | None = None

    def total_steps(self, world_size: int = 1) -> int:
        if self.steps is not None:
            return self.steps
        return (self.epochs or 1) * self.steps_per_epoch(world_size)

    def steps_per_epoch(self, world_size: int = 1) -> int:
        return max(1, self.samples_per_epoch // (self.batch_size * world_size))


PHASE_WEIGHTS_RULE = "a mapping of native / arterial / portal_venous / delayed to weights >= 0 (not all 0)"


class GeneraliseSection(_Section):
    """Probabilities of `data.synth.build_generalisation_pipeline` (used with `train.augment: generalise`)."""

    p_synth: Fraction = 0.5  # synthetic CT from the structure map
    p_contrast: Fraction = 0.8  # the real images' contrast phase re-drawn
    p_deform: Fraction = 0.8  # rotation, scale, elastic
    p_zoom: Fraction = 0.15  # in-plane zoom
    p_fov: Fraction = 0.25  # plane padded with air and a table
    p_partial: Fraction = 0.15  # an annotated structure cut at the patch border
    p_slab: Fraction = 0.2  # 10-40 axial slices, air elsewhere
    p_split_lumen: Fraction = 0.0  # arteries enhanced in part only
    # weights of the contrast phases drawn (synthesis and the real images' phase change); default
    # data.synth.DEFAULT_PHASE_PROBS (no delayed phase)
    phase_probs: typed(dict[Literal["native", "arterial", "portal_venous", "delayed"], NonNegativeFloat],
                       PHASE_WEIGHTS_RULE,
                       min_length=1) | None = None

    @field_validator("phase_probs")
    @classmethod
    def _some_weight(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None and sum(value.values()) <= 0:
            raise ValueError(PHASE_WEIGHTS_RULE)
        return value


class AverageSection(_Section):
    """`average: {parent: STAGE, parent_weight: 0.3}`: (1 - w) x the previous stage + w x stage `parent`."""

    parent: typed(str, "the name of an earlier stage")
    parent_weight: Fraction


class StageSection(_Section):
    """One stage: it starts from the previous stage's weights (the first from scratch) and overrides
    `train` and `generalise`; or an `average` of the previous stage with an earlier one."""

    name: typed(str, "a non-empty name without slashes", pattern=r"^[^/\\]*[^\s/\\.][^/\\]*$")
    version: Text | None = None  # the model version this stage's model carries
    init: Text | None = None  # start from this model folder (relative to the config) instead of the previous stage
    datasets: typed(list[str], "a list of dataset entry names") | None = None  # default: all
    train: typed(dict[str, Any], "a mapping of train settings") = Field(default_factory=dict)
    generalise: typed(dict[str, Any], "a mapping of generalise probabilities") = Field(default_factory=dict)
    average: AverageSection | None = None


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
    generalise: GeneraliseSection = Field(default_factory=GeneraliseSection)
    stages: typed(list[dict[str, Any]], "a list of stages (mappings)") = Field(default_factory=list)  # StageSection


@dataclass
class Stage:
    """A stage with its settings resolved (`RunConfig.stage_settings` applies the CPU section)."""

    name: str
    version: str | None
    datasets: list[str] | None
    train: dict[str, Any]
    generalise: GeneraliseSection
    average: AverageSection | None = None
    init: Path | None = None


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
    generalise: GeneraliseSection = field(default_factory=GeneraliseSection)
    stages: list[Stage] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)  # command-line train settings: win everywhere

    def settings(self, device_type: str, stage: Stage | None = None) -> TrainSettings:
        """The train settings on this device type: `train`, its `cpu` section on the CPU, then the
        stage's `train` (and its `cpu` section), then the command line's overrides."""
        return _merged_settings(self.train, device_type, stage.train if stage else {}, self.overrides)

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
                "train": self.train.model_dump(), "generalise": self.generalise.model_dump(),
                "stages": [asdict(s) for s in self.stages]}


def _merged_settings(base: TrainSettings, device_type: str, stage: dict[str, Any], overrides: dict[str, Any],
                     where: str = "train") -> TrainSettings:
    on_cpu = device_type == "cpu"
    merged = base.model_dump(exclude={"cpu"}, exclude_unset=True)
    merged.update((base.cpu or {}) if on_cpu else {})
    merged.update({k: v for k, v in stage.items() if k != "cpu"})
    merged.update((stage.get("cpu") or {}) if on_cpu else {})
    merged.update(overrides)
    return validate_section(TrainSettings, merged, where, UniversalSegError, prefix="config: ")


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


def _check_architecture(m: ModelSection, patch_sizes: dict[str, list[int]]) -> None:
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
    for where, size in patch_sizes.items():
        bad = [s for s in size if s % model.patch_multiple]
        _check(not bad, f"{where}: must be divisible by {model.patch_multiple} for backbone "
                        f"{m.backbone}, got {list(size)}")


def class_key(name: str) -> str:
    """The registry key of a class name as `model.classes` and `train.train_classes` take it (a key, display
    name or synonym); an unknown name is returned as it is (the caller says it is not a model class)."""
    from UniversalSegLib.registry import default_registry

    try:
        return default_registry().resolve(str(name)).key
    except UnknownClassError:
        return str(name)


def _check_train_classes(keys: list[str] | None, classes: list[str], where: str, lpg: str) -> None:
    """`train.train_classes` must name classes of the model (its keys, as `model.classes` resolves them),
    and needs one parameter generator per class (`lpg`: the model's) to train some of them alone."""
    _check(not keys or lpg == "per_class", f"{where}: needs a per-class parameter generator (model.lpg: "
                                           f"per_class), not {lpg!r}")
    for name in keys or []:
        key = class_key(name)
        _check(key in classes, f"{where}: {name!r} is not one of the model's classes")


def _resolve_stages(file: ConfigFile, overrides: dict[str, Any], base: Path,
                    classes: list[str], lpg: str) -> tuple[list[Stage], dict[str, list[int]]]:
    """Stages with their generalise sections merged; each stage's train settings checked on both device
    types (one-line errors name `stages[i].train.<field>`). Also the training patch sizes to check."""
    names = [e.get("name") for e in file.datasets if isinstance(e, dict)]
    stages: list[Stage] = []
    patches: dict[str, list[int]] = {}
    gpu = _merged_settings(file.train, "cuda", {}, overrides).patch_size
    cpu = _merged_settings(file.train, "cpu", {}, overrides, "train.cpu").patch_size
    patches.update({"train.patch_size": gpu} if gpu else {})
    patches.update({"train.cpu.patch_size": cpu} if cpu and cpu != gpu else {})
    for i, raw in enumerate(file.stages):
        where = f"stages[{i}]"
        s = validate_section(StageSection, raw, where, UniversalSegError, prefix="config: ")
        _check(s.name not in [t.name for t in stages], f"{where}.name: {s.name!r} is used twice")
        if s.average is not None:
            _check(not (s.train or s.generalise or s.datasets or s.init), f"{where}: an average stage trains "
                   "nothing (no train, generalise, datasets or init)")
            _check(bool(stages), f"{where}.average: needs a previous stage to average")
            _check(s.average.parent in [t.name for t in stages[:-1]],
                   f"{where}.average.parent: must name a stage before the previous one, got {s.average.parent!r}")
        for n in s.datasets or []:
            _check(n in names, f"{where}.datasets: no dataset entry is named {n!r}")
        if s.train.get("cpu") is not None:
            _check(isinstance(s.train["cpu"], dict), f"{where}.train.cpu: must be a mapping")
        for device_type in ("cpu", "cuda"):
            settings = _merged_settings(file.train, device_type, s.train, overrides, f"{where}.train")
            if settings.patch_size:
                patches[f"{where}.train.patch_size"] = settings.patch_size
            _check_train_classes(settings.train_classes, classes, f"{where}.train.train_classes", lpg)
        generalise = validate_section(GeneraliseSection, {**file.generalise.model_dump(), **s.generalise},
                                      f"{where}.generalise", UniversalSegError, prefix="config: ")
        init = None
        if s.init is not None:
            init = Path(s.init).expanduser()
            init = init if init.is_absolute() else (base / init).resolve()
            _check((init / "manifest.json").is_file(), f"{where}.init: {init} is not a model folder")
        stages.append(Stage(s.name, s.version, s.datasets, dict(s.train), generalise, s.average, init))
    return stages, patches


def parse_config(data: dict[str, Any], base_dir: str | Path = ".",
                 train_overrides: dict[str, Any] | None = None) -> RunConfig:
    """Validate a config mapping; relative paths are taken relative to `base_dir`.

    Args:
        data: the config as read from its file.
        base_dir: the folder relative paths start from (the config file's).
        train_overrides: train settings that win over the file's, in every stage (the command line's).
    """
    overrides = dict(train_overrides or {})
    if overrides and isinstance(data, dict):  # an override is checked where it applies, and shown as train.<key>
        data = {**data, "train": {**(data.get("train") or {}), **overrides}}
    file = validate_section(ConfigFile, data, "", UniversalSegError, prefix="config: ")
    name, base = file.name, Path(base_dir).resolve()
    preprocessing = file.preprocessing
    model = _validate_model(file.model)
    for device_type in ("cpu", "cuda"):
        top = _merged_settings(file.train, device_type, {}, overrides, "train.cpu" if device_type == "cpu" else "train")
        _check_train_classes(top.train_classes, model.classes, "train.train_classes", model.lpg)
    stages, patches = _resolve_stages(file, overrides, base, model.classes, model.lpg)
    _check_architecture(model, {"preprocessing.patch_size": preprocessing.patch_size, **patches})
    output = Path(file.output or f"runs/{name}").expanduser()
    output = output if output.is_absolute() else (base / output).resolve()
    return RunConfig(name=name, output=output, model=model, preprocessing=preprocessing, datasets=file.datasets,
                     train=file.train, base_dir=base, raw=data, generalise=file.generalise, stages=stages,
                     overrides=overrides)


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
    if isinstance(data, dict) and output is not None:
        data = {**data, "output": str(Path(output).expanduser().resolve())}
    return parse_config(data, path.parent, train_overrides)
