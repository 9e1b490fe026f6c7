"""Dataset specs: which files make up each source dataset and which registry classes it annotates.

A training config lists datasets as dicts (YAML or JSON):

    {name, format, root, label_map?: {value: class}, classes?: [...], cases?: [...], split?: ...}

`format` picks an adapter for a public layout (see `adapters.FORMATS`). Relative paths are resolved
against `base_dir` (the config file's folder). `classes` narrows the annotated classes (the other
labels then count as unannotated, not as background); `cases` keeps only the listed case ids (or,
for `plain`, lists the cases explicitly); `split` holds cases out for validation:
`{val: [ids]}`, `{val_fraction: 0.2, seed: 0}`, `none`, or `meta` (TotalSegmentator's meta.csv).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from UniversalSegLib.config_file import Rule, read_config_file, typed, validate_section
from UniversalSegLib.errors import InputError, UnknownClassError
from UniversalSegLib.registry import Registry, default_registry

log = logging.getLogger("UniversalSegLib.data")

_IGNORE = {"", "background", "ignore", "none", "null"}
_SIDE_WORDS = {"left": "left", "l": "left", "right": "right", "r": "right"}
# Dataset label names that neither a registry key nor a synonym covers. Values may be side-less
# paired keys ("kidney"), which are split into left/right when the target is built.
_ALIASES = {
    "kidney": "kidney", "kidneys": "kidney", "lung": "lung", "lungs": "lung",
    "adrenal": "adrenal_gland", "adrenal gland": "adrenal_gland", "adrenal glands": "adrenal_gland",
    "head of femur": "femur_head", "femur head": "femur_head", "femoral head": "femur_head",
    "prostate uterus": "prostate_or_uterus", "prostate or uterus": "prostate_or_uterus",
    "small bowel": "intestine", "postcava": "inferior_vena_cava", "vena cava inferior": "inferior_vena_cava",
    "portal and splenic vein": "portal_vein_and_splenic_vein", "arota": "aorta",
}


@dataclass
class LabelMapSource:
    """A label map file; `values` maps a voxel value to a class key (registry key or side-less pair)."""

    path: Path
    values: dict[int, str]


@dataclass
class MaskSource:
    """A binary mask file (any non-zero voxel) for one class key; several files may share a key (union)."""

    path: Path
    key: str


LabelSource = Union[LabelMapSource, MaskSource]
STRUCTURE_IDS = ("labels", "totalsegmentator")


@dataclass
class Case:
    """One CT and the label files that annotate it."""

    image: Path
    labels: list[LabelSource]
    case_id: str

    def files(self) -> list[Path]:
        return [self.image, *[s.path for s in self.labels]]


@dataclass
class StackedCase:
    """A composite case (`format: stack`): a block of `above` placed on top of `below` (data/stacking.py).

    The block starts `above_mm` mm above the lowest slice of class `above_from` in `above`; `below`'s
    axial plane is cropped (or padded) to the block's around the centre of structure `centre_on`.
    Each part keeps the classes its own dataset annotates; they count as absent from the other part.
    """

    below: Case
    below_spec: DatasetSpec
    above: Case
    above_spec: DatasetSpec
    above_from: str
    above_mm: float
    centre_on: str
    case_id: str

    @property
    def labels(self) -> list[LabelSource]:
        return [*self.below.labels, *self.above.labels]

    def files(self) -> list[Path]:
        return [*self.below.files(), *self.above.files()]


@dataclass
class DatasetSpec:
    """One source dataset. `classes` are the registry keys it annotates (partial labels)."""

    name: str
    cases: list[Case]
    classes: list[str]
    holdout: list[str] = field(default_factory=list)  # case ids kept for validation
    format: str = "plain"
    notes: list[str] = field(default_factory=list)
    # where the structure map of the generalisation augmentation comes from (data/cache.py):
    # "labels": the annotated classes' structure ids; "totalsegmentator": the label map files hold
    # TotalSegmentator v2 ids, and every structure they label is used (annotated or not)
    structure_ids: str = "labels"
    hide_structures: list[str] = field(default_factory=list)  # cleared from the structure map (leave-out runs)

    def train_cases(self) -> list[Case]:
        held = set(self.holdout)
        return [c for c in self.cases if c.case_id not in held]

    def val_cases(self) -> list[Case]:
        held = set(self.holdout)
        return [c for c in self.cases if c.case_id in held]

    def content_sha256(self) -> str:
        """SHA-256 over every case's files (each file's name and SHA-256, cases in id order): the
        data a model was trained on, recorded in its provenance. Reads each file once."""
        import hashlib

        total = hashlib.sha256()
        for case in sorted(self.cases, key=lambda c: c.case_id):
            for path in case.files():
                one = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        one.update(block)
                total.update(f"{case.case_id}\0{Path(path).name}\0{one.hexdigest()}\n".encode())
        return total.hexdigest()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key would otherwise be ignored


class SplitSection(_Section):
    """`split: {val: [ids]}` or `{val_fraction: 0.2, seed: 0}`."""

    val: typed(list[Any], "a list of case ids") | None = None
    val_fraction: typed(float, "a number in [0, 1)", ge=0, lt=1) | None = None
    seed: typed(int, "a non-negative integer", ge=0) = 0

    @model_validator(mode="after")
    def _one_rule(self) -> SplitSection:
        if (self.val is None) == (self.val_fraction is None):
            raise ValueError("give val or val_fraction")
        return self


class AboveFrom(_Section):
    """`above_from: {lowest: heart, mm: 48}`: where the stacked block starts."""

    lowest: typed(str, "a class key")
    mm: typed(float, "a number of mm", ge=0) = 0.0


class StackSection(_Section):
    """`stack: {below, above, above_from, centre_on}` of a `format: stack` entry (see `StackedCase`)."""

    below: typed(str, "the name of an earlier dataset entry")
    above: typed(str, "the name of an earlier dataset entry")
    above_from: AboveFrom
    centre_on: typed(str, "a class key or TotalSegmentator structure name")


class DatasetEntry(_Section):
    """One dataset entry of a training config or dataset file, checked (see the module docstring)."""

    name: typed(str, "a non-empty name", min_length=1)
    format: typed(str, "a format name") = "plain"
    root: typed(str, "a folder") = "."
    label_map: typed(dict[Any, Any], "a mapping {label value: class}") | None = None
    classes: typed(list[Any], "a list of class names") | None = None
    cases: typed(list[Any], "a list of case ids (plain: of case objects)") | None = None
    split: Annotated[Literal["none", "meta"] | SplitSection | None,
                     Rule("none, meta, {val: [ids]} or {val_fraction: f, seed: n}")] = None
    images: typed(str, "a sub-folder of root") = "images"  # plain: images/ and labels/ sub-folders
    labels: typed(str, "a sub-folder of root") = "labels"
    version: Annotated[str | int, Rule("a version such as 19, 21 or 23")] = ""  # KiTS release
    structure_ids: typed(Literal["labels", "totalsegmentator"], "labels or totalsegmentator") = "labels"
    stack: StackSection | None = None  # format: stack only
    # leave-out experiments: these structures are cleared from the structure map too, so the synthesis
    # never draws the shape of a class whose labels are left out (`classes:` narrows the labels)
    hide_structures: typed(list[str], "a list of class keys or TotalSegmentator structure names") = Field(
        default_factory=list)

    @model_validator(mode="after")
    def _stack_with_its_format(self) -> DatasetEntry:
        if (self.format.lower() == "stack") != (self.stack is not None):
            raise ValueError("stack: format stack needs a stack section, and only it has one")
        return self

    def adapter_fields(self) -> dict[str, Any]:
        """The entry as the format adapters read it."""
        return {**self.model_dump(exclude={"split", "stack"}),
                "split": self.split if isinstance(self.split, str) else None}


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", str(text).lower()).split()


def resolve_label_key(name: str, registry: Registry | None = None) -> str | None:
    """The class key for a dataset's label name, or None for background/unknown names.

    Tries a registry key, an alias, a side word ("left kidney", "kidney_l", "Kidney (R)") plus a
    paired key, then registry names and synonyms. Side-less paired organs give e.g. "kidney".
    """
    registry = registry or default_registry()
    text = str(name).strip()
    if text.lower() in _IGNORE:
        return None
    if text in registry:
        return text
    words = _words(text)
    phrase = " ".join(words)
    if phrase in _ALIASES:
        return _ALIASES[phrase]
    if phrase.replace(" ", "_") in registry:
        return phrase.replace(" ", "_")
    side = next((_SIDE_WORDS[w] for w in (words[:1] + words[-1:]) if w in _SIDE_WORDS), None) if words else None
    if side and len(words) > 1:
        rest = words[1:] if words[0] in _SIDE_WORDS else words[:-1]
        base = _ALIASES.get(" ".join(rest), "_".join(rest))
        if f"{base}_{side}" in registry:
            return f"{base}_{side}"
    try:
        return registry.resolve(text).key
    except UnknownClassError:
        return None


def normalise_label_map(raw: dict[Any, Any], registry: Registry, where: str) -> dict[int, str]:
    """Parse a config's {value: class} mapping (values may be names or synonyms; null ignores)."""
    out: dict[int, str] = {}
    for value, name in raw.items():
        try:
            v = int(value)
        except (TypeError, ValueError):
            raise InputError(f"{where}: label_map key {value!r} is not an integer label value") from None
        if name is None or str(name).lower() in _IGNORE:
            continue
        key = resolve_label_key(name, registry)
        if key is None:
            raise InputError(f"{where}: label_map value {name!r} is not a known class "
                             "(see `universalseg classes --all`)")
        out[v] = key
    return out


def resolve_path(path: str | Path, base: Path) -> Path:
    p = Path(str(path)).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def _apply_split(spec: DatasetSpec, split: SplitSection | str | None) -> None:
    ids = [c.case_id for c in spec.cases]
    if split is None or split == "meta":  # "meta" is read by the TotalSegmentator adapter
        return
    if split == "none":
        spec.holdout = []
        return
    if split.val is not None:
        unknown = sorted(set(map(str, split.val)) - set(ids))
        if unknown:
            raise InputError(f"dataset {spec.name}: split.val: lists unknown case ids {unknown[:5]}")
        spec.holdout = [str(i) for i in split.val]
    else:
        order = np.random.default_rng(split.seed).permutation(sorted(ids))
        n_val = min(len(ids) - 1, round(split.val_fraction * len(ids))) if len(ids) > 1 else 0
        spec.holdout = sorted(str(i) for i in order[:n_val])


def _check_classes(name: str, wanted: list[Any], provided: list[str], registry: Registry) -> list[str]:
    keys = []
    for c in wanted:
        key = resolve_label_key(str(c), registry)
        if key is None or key not in registry:
            raise InputError(f"dataset {name}: class {c!r} is not a registry class")
        if key not in provided:
            raise InputError(f"dataset {name}: class {key!r} is not in its labels (it provides: {', '.join(provided)})")
        keys.append(key)
    return keys


def load_dataset_specs(entries: list[dict], base_dir: Path, registry: Registry | None = None) -> list[DatasetSpec]:
    """Build a `DatasetSpec` per config entry, checking formats, paths and class keys."""
    from UniversalSegLib.data.adapters import FORMATS

    registry = registry or default_registry()
    base_dir = Path(base_dir)
    specs: list[DatasetSpec] = []
    for i, raw in enumerate(entries):
        label = raw.get("name") if isinstance(raw, dict) and isinstance(raw.get("name"), str) else None
        entry = validate_section(DatasetEntry, raw, "", InputError,
                                 prefix=f"dataset {label}: " if label else f"dataset entry {i + 1}: ")
        name, fmt = entry.name, entry.format.lower()
        if any(s.name == name for s in specs):
            raise InputError(f"dataset name {name!r} is used twice")
        if fmt == "stack":
            specs.append(stacked_spec(name, entry.stack, specs, registry))
            continue
        from UniversalSegLib.data.synth import structure_id

        unknown = [k for k in entry.hide_structures if structure_id(k) is None]
        if unknown:
            raise InputError(f"dataset {name}: hide_structures: {', '.join(unknown)} has no structure id")
        if fmt not in FORMATS:
            raise InputError(f"dataset {name}: format: unknown format {fmt!r} "
                             f"(known: {', '.join(sorted([*FORMATS, 'stack']))})")
        root = resolve_path(entry.root, base_dir)
        if not root.is_dir():
            raise InputError(f"dataset {name}: root folder {root} does not exist")
        spec = FORMATS[fmt](name, root, entry.adapter_fields(), registry)
        spec.format, spec.structure_ids, spec.hide_structures = fmt, entry.structure_ids, list(entry.hide_structures)
        if entry.cases is not None and fmt != "plain":
            keep = {str(c) for c in entry.cases}
            spec.cases = [c for c in spec.cases if c.case_id in keep]
            spec.holdout = [h for h in spec.holdout if h in keep]
        if entry.classes is not None:
            spec.classes = _check_classes(name, list(entry.classes), spec.classes, registry)
        _apply_split(spec, entry.split)
        if not spec.cases:
            raise InputError(f"dataset {name}: no cases found under {root} for format {fmt!r}")
        if not spec.classes:
            raise InputError(f"dataset {name}: annotates no registry class")
        ids = [c.case_id for c in spec.cases]
        if len(set(ids)) != len(ids):
            raise InputError(f"dataset {name}: case ids are not unique")
        for note in spec.notes:
            log.info("dataset %s: %s", name, note)
        specs.append(spec)
    return specs


def stacked_spec(name: str, stack: StackSection, earlier: list[DatasetSpec], registry: Registry) -> DatasetSpec:
    """The spec of a `format: stack` entry: one `StackedCase` per training case of `below`, each paired
    with a training case of `above` in turn. It annotates both parts' classes."""
    parts = {}
    for role in ("below", "above"):
        wanted = getattr(stack, role)
        found = next((s for s in earlier if s.name == wanted), None)
        if found is None:
            raise InputError(f"dataset {name}: stack.{role}: no earlier dataset entry is named {wanted!r}")
        if not found.train_cases():
            raise InputError(f"dataset {name}: stack.{role}: dataset {wanted!r} has no training cases")
        parts[role] = found
    lowest = resolve_label_key(stack.above_from.lowest, registry)
    if lowest not in parts["above"].classes:
        raise InputError(f"dataset {name}: stack.above_from.lowest: {stack.above_from.lowest!r} is not a class "
                         f"dataset {parts['above'].name!r} annotates")
    below, above = parts["below"], parts["above"]
    uppers = above.train_cases()
    cases = [StackedCase(low, below, uppers[i % len(uppers)], above, lowest, stack.above_from.mm, stack.centre_on,
                         f"{low.case_id}+{uppers[i % len(uppers)].case_id}")
             for i, low in enumerate(below.train_cases())]
    return DatasetSpec(name, cases, list(dict.fromkeys([*below.classes, *above.classes])), format="stack",
                       structure_ids=below.structure_ids, hide_structures=[*below.hide_structures,
                                                                           *above.hide_structures])


def load_dataset_file(path: str | Path, registry: Registry | None = None) -> list[DatasetSpec]:
    """Load specs from a YAML/JSON file holding a list of entries or {datasets: [...]}; paths are
    relative to the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"dataset config not found: {path}")
    try:
        data = read_config_file(path)
    except Exception as exc:  # noqa: BLE001 - a parse error is a user-facing bad file
        raise InputError(f"cannot parse {path}: {exc}") from exc
    entries = data.get("datasets") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise InputError(f"{path}: expected a list of datasets (or a 'datasets:' list)")
    return load_dataset_specs(entries, path.parent, registry)
