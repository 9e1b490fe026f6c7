"""The new data of an extension: input forms, preprocessing onto the model grid, and the held-out split.

Accepted forms of `data`:
- a dataset spec file (YAML/JSON, as for training; see `UniversalSegLib.data.spec`);
- a folder with `images/<case>.nii.gz` and `masks/<class_key>/<case>.nii.gz`;
- a folder holding one case: one image (`ct.nii.gz`, `image.*`, or the only image file) and
  `masks/<class_key>.nii.gz` (the layout of the demo angiogram);
- a list of `(image_path, {class_key: mask_path})` pairs (or dicts `{image, masks, id}`).

Only masks of the new classes are read; a case annotates the new classes it has masks for (the
others are unannotated there, not background). Every case is preprocessed exactly as in training
(`data.preprocess_case`: RAS, model spacing, HU window, body crop), in memory.

Held-out split: with several cases, the last `ceil(fraction * n)` cases (by id) are held out. With
one case, the volume is cut across the patient's long axis: the inferior `fraction` of its slices
(model layout (x, y, z), z increasing superior) is held out and the superior rest is trained on;
the two parts are separate volumes, so no patch or window sees across the cut.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from UniversalSegLib.data import Case, DatasetSpec, MaskSource, load_dataset_file, preprocess_case, resolve_label_key
from UniversalSegLib.data.adapters import strip_ext
from UniversalSegLib.errors import InputError
from UniversalSegLib.registry import Registry
from UniversalSegLib.store import Manifest

IMAGE_EXTS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr")
SPLIT_AXIS = 2  # model layout (x, y, z): z runs inferior -> superior


@dataclass
class ExtensionCase:
    """One preprocessed case: image float16 (x, y, z) in [0, 1]; labels uint8 (K_new, x, y, z)."""

    case_id: str
    image: np.ndarray
    labels: np.ndarray
    annotated: np.ndarray  # bool (K_new,)
    source: str = ""  # where it came from (file, and slab if split)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape)

    def slab(self, start: int, stop: int, suffix: str) -> ExtensionCase:
        """The slices [start, stop) along the long axis, as an independent case."""
        sl = [slice(None)] * 3
        sl[SPLIT_AXIS] = slice(start, stop)
        return replace(self, case_id=f"{self.case_id}{suffix}", image=self.image[tuple(sl)].copy(),
                       labels=self.labels[(slice(None), *sl)].copy(),
                       source=f"{self.source} z[{start}:{stop}] of {self.shape[SPLIT_AXIS]}")


@dataclass
class ExtensionData:
    """Training and held-out cases, and how they were chosen (recorded in the report and manifest)."""

    train: list[ExtensionCase]
    heldout: list[ExtensionCase]
    description: str
    split: str
    notes: list[str] = field(default_factory=list)


# --- input forms -> (Case, annotated keys) ---------------------------------------------------------

def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(IMAGE_EXTS)


def _mask_key(name: str, new_keys: Sequence[str], registry: Registry) -> str | None:
    if name in new_keys:
        return name
    key = resolve_label_key(name, registry)
    return key if key in new_keys else None


def _folder_cases(root: Path, new_keys: Sequence[str], registry: Registry) -> list[Case]:
    if (root / "images").is_dir():
        images = sorted(p for p in (root / "images").iterdir() if _is_image(p))
        mask_dirs = {k: d for d in sorted((root / "masks").glob("*/")) if (k := _mask_key(d.name, new_keys, registry))}
        cases = []
        for img in images:
            stem = strip_ext(img.name)
            masks = [MaskSource(p, k) for k, d in mask_dirs.items() for p in sorted(d.iterdir())
                     if _is_image(p) and strip_ext(p.name) in (stem, stem.removesuffix("_0000"))]
            cases.append(Case(img, masks, stem))
        return cases
    candidates = [p for p in root.iterdir() if _is_image(p)]
    named = [p for p in candidates if strip_ext(p.name).lower() in ("ct", "image", "img")]
    if len(named) == 1 or len(candidates) == 1:
        image = (named or candidates)[0]
    else:
        raise InputError(f"{root}: expected images/ + masks/<class>/ folders, or one image (e.g. ct.nii.gz) "
                         "with masks/<class>.nii.gz")
    masks = [MaskSource(p, k) for p in sorted((root / "masks").glob("*")) if _is_image(p)
             and (k := _mask_key(strip_ext(p.name), new_keys, registry))]
    return [Case(image, masks, root.name)]


def _pair_case(i: int, item: Any, new_keys: Sequence[str], registry: Registry) -> Case:
    if isinstance(item, dict):
        image, masks, case_id = item.get("image"), item.get("masks") or {}, item.get("id")
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        (image, masks), case_id = item, None
    else:
        raise InputError(f"data item {i + 1}: expected (image_path, {{class_key: mask_path}})")
    if not image or not Path(image).is_file():
        raise InputError(f"data item {i + 1}: image file not found: {image}")
    sources = []
    for name, path in dict(masks).items():
        key = _mask_key(str(name), new_keys, registry)
        if key is None:
            continue  # masks of old classes are not used: old classes learn from pseudo-labels
        if not Path(path).is_file():
            raise InputError(f"data item {i + 1}: mask file not found: {path}")
        sources.append(MaskSource(Path(path), key))
    return Case(Path(image), sources, str(case_id or f"{i + 1:03d}_{strip_ext(Path(image).name)}"))


def collect_cases(data: Any, new_keys: Sequence[str], registry: Registry) -> tuple[list[tuple[Case, list[str]]],
                                                                                   list[str], str]:
    """(case, annotated new keys) pairs, case ids held out by a spec's own split, and a description."""
    held: list[str] = []
    if isinstance(data, (str, Path)) and Path(data).is_file():
        specs = load_dataset_file(Path(data), registry)
        pairs = [(c, [k for k in s.classes if k in new_keys]) for s in specs for c in s.cases]
        held = [h for s in specs for h in s.holdout]
        description = f"dataset spec {Path(data).resolve()}"
    elif isinstance(data, (str, Path)) and Path(data).is_dir():
        cases = _folder_cases(Path(data), new_keys, registry)
        pairs = [(c, sorted({s.key for s in c.labels})) for c in cases]
        description = f"folder {Path(data).resolve()}"
    elif isinstance(data, (list, tuple)):
        cases = [_pair_case(i, item, new_keys, registry) for i, item in enumerate(data)]
        pairs = [(c, sorted({s.key for s in c.labels})) for c in cases]
        description = f"{len(cases)} image/mask pair(s) given in Python"
    else:
        raise InputError(f"data {data!r}: give a dataset spec file, a folder, or a list of (image, masks) pairs")
    return pairs, held, description


# --- preprocessing and split -----------------------------------------------------------------------

def preprocess(case: Case, annotated: Sequence[str], new_keys: Sequence[str], manifest: Manifest,
               registry: Registry) -> ExtensionCase:
    """One case on the model grid, with label channels in `new_keys` order."""
    spec = DatasetSpec(name="extension", cases=[case], classes=list(annotated))
    image, labels, flags = preprocess_case(case, spec, list(new_keys), manifest.preprocessing, registry)
    return ExtensionCase(case.case_id, image, labels, flags, source=str(case.image))


def split_slabs(case: ExtensionCase, fraction: float, min_slices: int) -> tuple[ExtensionCase, ExtensionCase]:
    """(superior part, inferior `fraction`) of one case along the long axis."""
    n = case.shape[SPLIT_AXIS]
    cut = int(round(fraction * n))
    if cut < min_slices or n - cut < min_slices:
        raise InputError(f"case {case.case_id} has {n} slices on the model grid: too few to hold out "
                         f"{fraction:.0%} and keep at least {min_slices} on each side; give more data or "
                         "set holdout_fraction to 0")
    return case.slab(cut, n, "_train"), case.slab(0, cut, "_heldout")


def split_cases(cases: list[ExtensionCase], fraction: float, min_slices: int) -> tuple[list, list, str]:
    """(kept, held out, description) by whole cases when there are several, else by slab."""
    if fraction <= 0:
        return list(cases), [], "no held-out data"
    if len(cases) == 1:
        keep, off = split_slabs(cases[0], fraction, min_slices)
        return [keep], [off], (f"single case split along the long axis: inferior {fraction:.0%} of its "
                               f"{cases[0].shape[SPLIT_AXIS]} slices held out ({off.source})")
    n_off = min(len(cases) - 1, max(1, math.ceil(fraction * len(cases))))
    ordered = sorted(cases, key=lambda c: c.case_id)
    keep, off = ordered[:-n_off], ordered[-n_off:]
    return keep, off, f"{n_off} of {len(cases)} cases held out (last by id): {', '.join(c.case_id for c in off)}"


def load_extension_data(data: Any, new_keys: Sequence[str], manifest: Manifest, registry: Registry,
                        holdout_fraction: float = 0.3, min_slices: int = 8) -> ExtensionData:
    """Read, preprocess and split the new data; checks each new class is annotated somewhere."""
    if not 0 <= holdout_fraction < 1:
        raise InputError("holdout_fraction must be in [0, 1)")
    pairs, held_ids, description = collect_cases(data, new_keys, registry)
    pairs = [(c, keys) for c, keys in pairs if keys]
    missing = [k for k in new_keys if not any(k in keys for _, keys in pairs)]
    if missing:
        raise InputError(f"no mask found for new class(es) {', '.join(missing)} in {description}")
    cases = [preprocess(c, keys, new_keys, manifest, registry) for c, keys in pairs]
    if held_ids:
        train = [c for c in cases if c.case_id not in held_ids]
        heldout = [c for c in cases if c.case_id in held_ids]
        split = f"the spec's own split: {len(heldout)} case(s) held out"
    else:
        train, heldout, split = split_cases(cases, holdout_fraction, min_slices)
    if not train:
        raise InputError("no training data left after holding out")
    return ExtensionData(train, heldout, description, split)
