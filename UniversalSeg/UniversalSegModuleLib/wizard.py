"""The add-classes wizard without its GUI: checks each step, lays out the training data, builds the
`universalseg extend` command line, follows the training and reads its report.

Training data goes to the backend as a folder in the layout `extend --data` reads:
    images/<case>.<ext>             the CT of each case
    masks/<class key>/<case>.<ext>  a binary mask of a new class on that case's grid (a case may lack some)
Each new class goes in a classes file (`extend --classes-file`, JSON) with its own name, prompt, group,
parents, colour, synonyms and whether it lies only in the trunk, so classes trained together need not
share anything. An empty prompt is left out: the backend then uses the registry's prompt for a
structure it knows, else the name. The backend checks the classes (`classes --new-classes`, see the
module's Logic) before anything is exported; this file checks only what the wizard itself asks for.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from UniversalSegModuleLib.backend import DEVICES, ProgressEvent

GROUPS = ("organ", "vessel", "tumour", "bone", "muscle", "other")  # as UniversalSegLib.registry.GROUPS
TRAIN_MODES = {"heads": "New class heads only (fastest; the old classes are untouched)",
               "heads+decoder": "Heads and decoder (better fit, still protects the old classes)",
               "all": "The whole network (slowest; most adaptable)"}
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")  # single-file formats (safe to link or copy)
IMAGE_STEMS = ("image", "ct", "img", "volume")
MASK_FOLDERS = ("", "masks", "segmentations", "labels")


# Colours for new classes the user names (distinguishable from each other and from the usual organ colours).
NEW_CLASS_COLORS = ((230, 160, 40), (40, 170, 230), (200, 60, 160), (120, 200, 60), (240, 90, 60), (150, 110, 230))


def distinct_color(index: int) -> tuple[int, int, int]:
    """The colour for the `index`-th new class of a wizard session."""
    return NEW_CLASS_COLORS[index % len(NEW_CLASS_COLORS)]


@dataclass
class NewClass:
    """A structure the model should learn, with the fields `extend` gives it (see `to_spec`)."""

    key: str
    name: str
    prompt: str = ""
    group: str = "other"
    parents: list[str] = field(default_factory=list)
    color: tuple[int, int, int] = NEW_CLASS_COLORS[0]
    synonyms: list[str] = field(default_factory=list)
    # True: never in an arm or leg (inference removes it there and may blank the arms before the model);
    # None: the backend's default (`default_trunk_only`).
    trunk: bool | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NewClass:
        """From {key, name, prompt, group, parents, color|colour, synonyms, trunk}; unknown fields are an error."""
        fields = dict(data)
        if "colour" in fields:
            fields["color"] = fields.pop("colour")
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"new class {fields.get('key', '?')!r}: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**fields)
        except TypeError as e:  # a required field (key, name) is missing
            raise ValueError(f"new class {fields.get('key', '?')!r}: {e}") from None

    def to_spec(self) -> dict[str, Any]:
        """The class as one entry of `extend --classes-file` (an empty prompt: the backend's default)."""
        spec: dict[str, Any] = {"key": self.key, "name": self.name, "group": self.group,
                                "parents": list(self.parents), "color": [int(v) for v in self.color]}
        if self.prompt.strip():
            spec["prompt"] = self.prompt.strip()
        if self.synonyms:
            spec["synonyms"] = list(self.synonyms)
        if self.trunk is not None:
            spec["location"] = {"trunk": self.trunk}
        return spec


@dataclass
class TrainingCase:
    """One training image with binary masks of (some of) the new classes on its grid."""

    image: str
    masks: dict[str, str]
    source: str = ""


@dataclass
class TrainingSettings:
    """How much and what to train, and where the extended model goes."""

    base_model: str
    output_name: str
    epochs: int | None = 100
    time_budget_minutes: float | None = None
    train: str = "heads"
    device: str = "auto"


def suggest_key(name: str) -> str:
    """A class key from a display name: "Aorta, false lumen" -> "aorta_false_lumen"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def validate_classes(new: Sequence[NewClass]) -> list[str]:
    """What the wizard asks of the new classes, one line each: at least one, each named. Keys, groups,
    parents, colours and locations are the backend's to check (`classes --new-classes`)."""
    if not new:
        return ["add at least one new class"]
    return [f"class {i} ({c.key or 'unnamed'}): give it a name" for i, c in enumerate(new, 1) if not c.name.strip()]


def default_trunk_only(key: str, parents: Sequence[str], model_classes: Iterable[Mapping[str, Any]],
                       registry_classes: Iterable[Mapping[str, Any]]) -> bool:
    """The "lies only in the trunk" default of a new class, by the backend's rule
    (UniversalSegLib.registry.location.new_class_location, which this process cannot import; a test
    holds the two together): a structure the registry knows keeps its registry location; any other is
    trunk-only exactly when every parent is, and never without a parent (its place is unknown, and a
    trunk-only class is removed from arms and legs).

    Args:
        key: the new class's key.
        parents: its parents' keys.
        model_classes, registry_classes: `classes --json` and `classes --all --json` entries, each with
            the "location" inference applies.
    """
    def trunk(entry: Mapping[str, Any]) -> bool:
        return bool((entry.get("location") or {}).get("trunk", True))

    registry = {c["key"]: c for c in registry_classes}
    if key in registry and registry[key].get("location"):
        return trunk(registry[key])
    known = {c["key"]: c for c in model_classes}
    return bool(parents) and all(p in known and trunk(known[p]) for p in parents)


def validate_cases(cases: Sequence[TrainingCase], new_keys: Collection[str]) -> list[str]:
    """Problems with the training data: every new class needs at least one labelled case."""
    if not cases:
        return ["add at least one training image with its segmentation"]
    errors = []
    for i, case in enumerate(cases, 1):
        if not case.image:
            errors.append(f"case {i}: no image")
        if not case.masks:
            errors.append(f"case {i}: no mask of a new class")
        for key in case.masks:
            if key not in new_keys:
                errors.append(f"case {i}: mask for {key!r}, which is not one of the new classes")
    for key in new_keys:
        if not any(key in case.masks for case in cases):
            errors.append(f"new class {key!r} has no training mask")
    return errors


def validate_settings(settings: TrainingSettings, existing_models: Collection[str]) -> list[str]:
    errors = []
    if not settings.base_model:
        errors.append("choose the model to extend")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", settings.output_name or ""):
        errors.append("the new model's name may contain letters, digits, '.', '_' and '-' only")
    elif settings.output_name in existing_models:
        errors.append(f"a model named {settings.output_name!r} already exists; choose another name")
    if settings.epochs is None and settings.time_budget_minutes is None:
        errors.append("set a number of epochs or a time budget")
    if settings.epochs is not None and settings.epochs < 1:
        errors.append("epochs must be at least 1")
    if settings.time_budget_minutes is not None and settings.time_budget_minutes <= 0:
        errors.append("the time budget must be positive")
    if settings.train not in TRAIN_MODES:
        errors.append(f"what to train must be one of {', '.join(TRAIN_MODES)}")
    if settings.device not in DEVICES:
        errors.append(f"device must be one of {', '.join(DEVICES)}")
    return errors


def _suffix(path: str | Path) -> str:
    name = Path(path).name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), Path(path).suffix)


def _place(source: str | Path, target: Path) -> None:
    """Hard-link (no copy of big CTs) when the file system allows it, else copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_training_folder(cases: Sequence[TrainingCase], folder: str | Path) -> Path:
    """Lay the cases out as `extend --data` reads a folder: images/<case>.* and masks/<key>/<case>.*."""
    folder = Path(folder)
    for i, case in enumerate(cases, 1):
        case_id = f"case{i:03d}"
        _place(case.image, folder / "images" / f"{case_id}{_suffix(case.image)}")
        for key, mask in case.masks.items():
            _place(mask, folder / "masks" / key / f"{case_id}{_suffix(mask)}")
    return folder


def write_classes_file(new: Sequence[NewClass], path: str | Path) -> Path:
    """Write the new classes, each with its own fields, as `extend --classes-file` reads them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([c.to_spec() for c in new], indent=2), encoding="utf-8")
    return path


def extend_args(settings: TrainingSettings, data_folder: str | Path, classes_file: str | Path,
                output_dir: str | Path) -> list[str]:
    """Arguments of `universalseg extend` as the wizard runs it (classes from `write_classes_file`)."""
    args = ["extend", "--model", settings.base_model, "--data", str(data_folder), "--classes-file",
            str(classes_file), "-o", str(output_dir), "--train", settings.train, "--device", settings.device]
    if settings.epochs is not None:
        args += ["--epochs", str(int(settings.epochs))]
    if settings.time_budget_minutes is not None:
        args += ["--time-budget", f"{60.0 * float(settings.time_budget_minutes):g}"]  # seconds
    return [*args, "--progress-json"]


def _image_in(folder: Path) -> Path | None:
    for stem in IMAGE_STEMS:
        for suffix in IMAGE_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def _mask_in(folder: Path, key: str) -> Path | None:
    for sub in MASK_FOLDERS:
        for suffix in IMAGE_SUFFIXES:
            path = folder / sub / f"{key}{suffix}"
            if path.is_file():
                return path
    return None


def cases_from_folder(folder: str | Path, new_keys: Iterable[str]) -> list[TrainingCase]:
    """Training cases from a folder: one case per sub-folder (or the folder itself) holding
    `image.*` or `ct.*` and one binary mask per new class named `<key>.*`, beside it or in masks/."""
    folder = Path(folder)
    keys = list(new_keys)
    candidates = [folder] if _image_in(folder) else sorted(p for p in folder.iterdir() if p.is_dir())
    cases = []
    for case_dir in candidates:
        image = _image_in(case_dir)
        masks = {k: str(m) for k in keys if (m := _mask_in(case_dir, k)) is not None}
        if image and masks:
            cases.append(TrainingCase(str(image), masks, source=str(case_dir)))
    return cases


@dataclass
class ExtendReport:
    """What `extend` measured: held-out Dice of the new classes and how well old classes were kept
    (Dice of the extended model's old-class masks against the base model's), each also for naive
    fine-tuning when the backend ran that comparison."""

    new_class_dice: dict[str, float]
    retention: dict[str, float]
    naive_new_class_dice: dict[str, float] = field(default_factory=dict)
    naive_retention: dict[str, float] = field(default_factory=dict)
    summary: str = ""

    def rows(self) -> list[tuple[str, str, float, float | None]]:
        """(measure, class, value, value with naive fine-tuning) for a table."""
        rows: list[tuple[str, str, float, float | None]] = [("new class Dice (held out)", k, v,
                                                             self.naive_new_class_dice.get(k))
                                                            for k, v in self.new_class_dice.items()]
        rows += [("old class retention", k, v, self.naive_retention.get(k)) for k, v in self.retention.items()]
        return rows


def _mean_per_class(images: Any, section: str, field_name: str) -> dict[str, float]:
    """Mean over images of images[i][section][key][field_name] (the backend's per-image scores)."""
    values: dict[str, list[float]] = {}
    for image in images if isinstance(images, list) else []:
        for key, row in (image.get(section) or {}).items():
            value = row.get(field_name) if isinstance(row, dict) else None
            if isinstance(value, (int, float)):
                values.setdefault(key, []).append(float(value))
    return {k: sum(v) / len(v) for k, v in values.items()}


def _summary(data: Mapping[str, Any]) -> str:
    lines = []
    if data.get("model_name"):
        lines.append(f"Extended {(data.get('parent') or {}).get('name', '?')} -> {data['model_name']}")
    settings, timing = data.get("settings") or {}, data.get("timing_s") or {}
    if settings:
        lines.append(f"Training: {settings.get('train', '?')}, {timing.get('extension', 0):.0f} s")
    for name, figures in (data.get("retention_summary") or {}).items():
        mean = figures.get("extended_mean_retention")
        if isinstance(mean, (int, float)):
            lines.append(f"Mean retention on {name}: {mean:.3f}")
    return "\n".join(lines + [str(n) for n in data.get("notes") or []])


def parse_report(report: Mapping[str, Any] | str | Path) -> ExtendReport:
    """Read the report of `extend` (the dict of its done line, or a JSON file)."""
    data = report if isinstance(report, Mapping) else json.loads(Path(report).read_text(encoding="utf-8"))
    return ExtendReport(
        new_class_dice=_mean_per_class(data.get("heldout"), "new", "extended_dice"),
        retention=_mean_per_class(data.get("retention"), "old", "extended_retention"),
        naive_new_class_dice=_mean_per_class(data.get("heldout"), "new", "naive_dice"),
        naive_retention=_mean_per_class(data.get("retention"), "old", "naive_retention"),
        summary=str(data.get("summary") or _summary(data)))


class LossHistory:
    """Training curve points gathered from progress lines that carry a "loss"."""

    def __init__(self) -> None:
        self.points: list[tuple[float, float]] = []

    def add(self, event: ProgressEvent) -> bool:
        loss = event.data.get("loss")
        if not isinstance(loss, (int, float)):
            return False
        x = event.data.get("step", event.data.get("epoch", len(self.points)))
        self.points.append((float(x) if isinstance(x, (int, float)) else float(len(self.points)), float(loss)))
        return True


def plot_coordinates(points: Sequence[tuple[float, float]], width: int, height: int,
                     margin: int = 8) -> list[tuple[int, int]]:
    """Pixel positions of a loss curve in a width x height image (y axis from 0 to the largest loss)."""
    if not points:
        return []
    xs = [p[0] for p in points]
    top = max(p[1] for p in points) or 1.0
    x0, x1 = min(xs), max(xs)
    span = (x1 - x0) or 1.0
    inner_w, inner_h = width - 2 * margin, height - 2 * margin
    return [(margin + round((x - x0) / span * inner_w), margin + round((1 - max(y, 0.0) / top) * inner_h))
            for x, y in points]
