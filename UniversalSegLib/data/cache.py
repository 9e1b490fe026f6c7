"""Preprocessing of training cases, and an on-disk cache so epochs never re-resample a volume.

`preprocess_case` turns one case into arrays on the model's grid: RAS, `spacing` mm (image linear,
labels nearest), HU clipped to `hu_window` and scaled to [0, 1], cropped to the body as inference crops
it (`geometry.crop_box`), and a multi-hot target in the model's class order with the papers' rules.
The cache keeps the HU above the window (values over 1; `keep_above_window`): augmentation that changes
a contrast phase must see a 470 HU lumen as it is, not as a flat 250. The loader and the augmentation
pipeline clip to [0, 1] before the model (`PatchDataset`, `synth.ClipToWindow`).

`PreprocessedCache` keeps one folder per (case files, labels, annotated classes, preprocessing, class
keys): image.npy (float16), labels.npy (annotated channels bit-packed, uint8), locations.npz (sampled
voxel positions per annotated class, for foreground patch centres), meta.json and, when the run's
augmentation synthesises from anatomy, structure.npy (int16 structure map, `synth.build_structure_map`).
A `StackedCase` (format `stack`) is its two parts preprocessed as above and stacked (data/stacking.py).
Arrays are
uncompressed so patches are read through memory maps. A folder is written under a temporary name and
renamed in one step, so an interrupted run leaves no half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from UniversalSegLib.data.labels import apply_label_rules, pair_sides
from UniversalSegLib.data.spec import Case, DatasetSpec, LabelMapSource, MaskSource, StackedCase
from UniversalSegLib.data.volume import CaseGrid, read_ct, read_label
from UniversalSegLib.errors import InputError
from UniversalSegLib.io.atomic import atomic_dir
from UniversalSegLib.progress import CountFn
from UniversalSegLib.registry import Registry, default_registry, safe_file_name

if TYPE_CHECKING:  # importing the store pulls in the models; pool workers should stay light
    from UniversalSegLib.store.manifest import Preprocessing

CACHE_VERSION = 3  # 2: the body crop is inference's (-500 HU, 6 mm margin); 3: HU above the window kept
LOCATIONS_PER_CLASS = 4096
_STALE_TMP_SECONDS = 24 * 3600



# --- preprocessing --------------------------------------------------------------------------------

def _relevant_keys(annotated: set[str], registry: Registry, keys: Iterable[str]) -> set[str]:
    """Label keys whose voxels can reach an annotated channel (directly, by side split, or as a parent's
    inclusion)."""
    out = set()
    for key in keys:
        sides = set(pair_sides(key, registry) or ())
        parents = set(registry[key].parents) if key in registry else set()
        if key in annotated or sides & annotated or parents & annotated:
            out.add(key)
    return out


def _source_masks(case: Case, grid: CaseGrid, relevant: set[str]) -> dict[str, np.ndarray]:
    masks: dict[str, np.ndarray] = {}

    def add(key: str, mask: np.ndarray) -> None:
        masks[key] = masks[key] | mask if key in masks else mask

    for source in case.labels:
        if isinstance(source, LabelMapSource):
            wanted = {v: k for v, k in source.values.items() if k in relevant}
            if wanted:
                labels = grid.label(read_label(source.path), binary=False)
                for value, key in wanted.items():
                    add(key, labels == value)
        elif isinstance(source, MaskSource) and source.key in relevant:
            add(source.key, grid.label(read_label(source.path), binary=True))
    return masks


def structure_map(case: Case, spec: DatasetSpec, grid: CaseGrid) -> np.ndarray:
    """The case's anatomy as an int16 structure map on `grid` (synth.build_structure_map), from its label
    files: with `spec.structure_ids == "totalsegmentator"` a label map's values are TotalSegmentator v2
    ids, used as they are (every structure, annotated or not); otherwise each labelled class's id."""
    from UniversalSegLib.data.synth import build_structure_map, label_map_from_masks, structure_id

    ids = None
    masks: dict[str, np.ndarray] = {}
    for source in case.labels:
        if isinstance(source, LabelMapSource):
            values = grid.label(read_label(source.path), binary=False)
            if spec.structure_ids == "totalsegmentator":
                ids = values
            else:
                for value, key in source.values.items():
                    masks[key] = masks.get(key, False) | (values == value)
        else:
            masks[source.key] = masks.get(source.key, False) | grid.label(read_label(source.path), binary=True)
    # HU unclipped, air outside the scan: build_structure_map finds the body and the lungs by HU
    hu = grid.image(default_hu=-1024.0)
    if ids is None:
        ids = label_map_from_masks(masks) if masks else None
    ids = build_structure_map(hu, ids, spacing_mm=grid.spacing).astype(np.int16)
    for key in spec.hide_structures:  # 0 inside the body: completed from the image at synthesis time
        ids[ids == structure_id(key)] = 0
    return ids


def preprocess_entry(case: Case | StackedCase, spec: DatasetSpec, class_keys: list[str],
                     preprocessing: Preprocessing, structure: bool = False,
                     registry: Registry | None = None) -> tuple[np.ndarray, np.ndarray, list[int], np.ndarray | None]:
    """What a cache entry stores: `preprocess_annotated`'s arrays and, with `structure`, the structure map
    (None without). A `StackedCase` is built from its two preprocessed parts."""
    if isinstance(case, StackedCase):
        return _preprocess_stacked(case, class_keys, preprocessing, structure, registry)
    found = preprocess_annotated(case, spec, class_keys, preprocessing, registry, structure=structure,
                                 keep_above_window=True)
    return found if structure else (*found, None)


def _preprocess_stacked(case: StackedCase, class_keys: list[str], preprocessing: Preprocessing, structure: bool,
                        registry: Registry | None) -> tuple[np.ndarray, np.ndarray, list[int], np.ndarray | None]:
    from UniversalSegLib.data.stacking import lowest_slice_above, stack_above
    from UniversalSegLib.data.synth import structure_id

    parts = {}
    for role, part, part_spec in (("below", case.below, case.below_spec), ("above", case.above, case.above_spec)):
        image, stack, channels, ids = preprocess_annotated(part, part_spec, class_keys, preprocessing, registry,
                                                           structure=True, keep_above_window=True)
        parts[role] = {"image": image, "structure_map": ids, **{class_keys[c]: m for c, m in zip(channels, stack)}}
    above = parts["above"]
    try:
        first = lowest_slice_above(above[case.above_from], case.above_mm, float(preprocessing.spacing[2]))
    except ValueError as e:
        raise InputError(f"{case.case_id}: stack.above_from: {case.above_from}: {e}") from None
    above = {k: v[..., first:] for k, v in above.items()}
    if next(iter(above.values())).shape[2] == 0:
        raise InputError(f"{case.case_id}: stack.above_from: the block would start above the scan's top")
    sid = structure_id(case.centre_on)
    anchor = np.argwhere(parts["below"]["structure_map"] == sid) if sid is not None else np.zeros((0, 3))
    if not len(anchor):
        raise InputError(f"{case.case_id}: stack.centre_on: no {case.centre_on!r} in the lower part's structure map")
    out = stack_above(parts["below"], above, anchor.mean(0)[:2])
    channels = [k for k, key in enumerate(class_keys) if key in out]
    masks = np.stack([out[class_keys[k]] for k in channels]) if channels else np.zeros((0, *out["image"].shape), bool)
    return out["image"], masks, channels, out["structure_map"] if structure else None


def preprocess_annotated(case: Case, spec: DatasetSpec, class_keys: list[str], preprocessing: Preprocessing,
                         registry: Registry | None = None, *, structure: bool = False,
                         keep_above_window: bool = False):
    """`preprocess_case` without the unannotated channels: (image float16 (D,H,W), masks bool (A,D,H,W),
    channels: the A annotated indices into `class_keys`). Memory grows with A, not with the model's K.
    With `structure`, a fourth item: the case's structure map (int16 (D,H,W), `structure_map`).
    With `keep_above_window`, HU above the window are scaled, not clipped (values over 1)."""
    registry = registry or default_registry()
    if str(preprocessing.orientation).upper() != "RAS":
        raise InputError(f"training preprocessing supports orientation RAS only, not {preprocessing.orientation!r}")
    lo, hi = (float(v) for v in preprocessing.hu_window)
    # The crop box is the body as inference finds it (geometry.crop_box), found before resampling so every
    # label volume goes through one cheap crop; new border voxels get `lo`, i.e. 0 after scaling.
    grid = CaseGrid(read_ct(case.image), preprocessing.spacing, bool(preprocessing.foreground_crop))
    image = grid.image(default_hu=lo)
    image = ((np.clip(image, lo, None if keep_above_window else hi) - lo) / (hi - lo)).astype(np.float16)

    annotated = set(spec.classes) & set(class_keys)
    all_keys = {k for s in case.labels for k in (s.values.values() if isinstance(s, LabelMapSource) else [s.key])}
    masks = _source_masks(case, grid, _relevant_keys(annotated, registry, all_keys))
    body = np.nonzero((image > 0).any(axis=(1, 2)))[0]
    midline = float(body.min() + body.max()) / 2 if body.size else None
    masks = apply_label_rules(masks, annotated, registry, midline=midline) if masks else {}

    channels = [k for k, key in enumerate(class_keys) if key in annotated]
    stack = np.zeros((len(channels), *image.shape), dtype=bool)
    for row, k in enumerate(channels):
        mask = masks.get(class_keys[k])
        if mask is not None:
            if mask.shape != image.shape:
                raise InputError(f"{case.case_id}: label grid {mask.shape} does not match image {image.shape}")
            stack[row] = mask
    if structure:
        return image, stack, channels, structure_map(case, spec, grid)
    return image, stack, channels


def preprocess_case(case: Case, spec: DatasetSpec, class_keys: list[str], preprocessing: Preprocessing,
                    registry: Registry | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case on the model's grid: (image float16 (D,H,W) in [0,1], labels uint8 (K,D,H,W) multi-hot in
    `class_keys` order, annotated bool (K,)). Channels the dataset does not annotate are zeros."""
    image, stack, channels = preprocess_annotated(case, spec, class_keys, preprocessing, registry)
    labels = np.zeros((len(class_keys), *image.shape), dtype=np.uint8)
    labels[channels] = stack
    annotated = np.zeros(len(class_keys), dtype=bool)
    annotated[channels] = True
    return image, labels, annotated


# --- cache entries --------------------------------------------------------------------------------

def _file_stamp(path: Path) -> list:
    try:
        st = Path(path).stat()
    except OSError as exc:
        raise InputError(f"training file not found: {path}") from exc
    return [str(Path(path).resolve()), st.st_mtime_ns, st.st_size]


def _sources(case: Case | StackedCase) -> list:
    if isinstance(case, StackedCase):
        return [["stack", case.above_from, case.above_mm, case.centre_on],
                *[[role, sorted(part.classes), part.structure_ids, sorted(part.hide_structures), _sources(case_part)]
                  for role, part, case_part in (("below", case.below_spec, case.below),
                                                ("above", case.above_spec, case.above))]]
    return [["map", sorted(s.values.items())] if isinstance(s, LabelMapSource) else ["mask", s.key]
            for s in case.labels]


def case_key(case: Case | StackedCase, spec: DatasetSpec, class_keys: list[str], preprocessing: Preprocessing,
             structure: bool = False) -> str:
    """Hash of everything the cached arrays depend on (files with mtime and size, label meaning,
    annotated classes, class order, the grid/intensity settings and, with `structure`, where the
    structure map comes from)."""
    sources = _sources(case)
    payload = {
        "version": CACHE_VERSION, "files": [_file_stamp(p) for p in case.files()], "sources": sources,
        "annotated": sorted(spec.classes), "class_keys": list(class_keys),
        "pre": [preprocessing.orientation, [float(s) for s in preprocessing.spacing],
                [float(v) for v in preprocessing.hu_window], bool(preprocessing.foreground_crop)],
    }
    if structure:  # entries without a structure map keep the key they had before structure maps existed
        payload["structure"] = [spec.structure_ids, sorted(spec.hide_structures)]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _locations(masks: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for c, mask in enumerate(masks):
        where = np.argwhere(mask)
        if len(where) > LOCATIONS_PER_CLASS:
            where = where[rng.choice(len(where), LOCATIONS_PER_CLASS, replace=False)]
        out[str(c)] = where.astype(np.int32)
    return out


@dataclass
class CachedCase:
    """A cached case, read through memory maps. `channels` are the annotated class indices."""

    path: Path
    dataset: str
    case_id: str
    shape: tuple[int, int, int]
    spacing: list[float]
    channels: list[int]
    num_classes: int
    _maps: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: Path) -> CachedCase:
        meta = json.loads((Path(path) / "meta.json").read_text())
        return cls(Path(path), meta["dataset"], meta["case"], tuple(meta["shape"]), meta["spacing"],
                   meta["channels"], len(meta["class_keys"]))

    def _map(self, name: str) -> np.ndarray:
        if name not in self._maps:
            self._maps[name] = np.load(self.path / f"{name}.npy", mmap_mode="r")
        return self._maps[name]

    @property
    def annotated(self) -> np.ndarray:
        flags = np.zeros(self.num_classes, dtype=bool)
        flags[self.channels] = True
        return flags

    def image(self, region: tuple[slice, ...] = ()) -> np.ndarray:
        """Window values, HU above the window kept (over 1): clip to [0, 1] before a model sees them."""
        return np.asarray(self._map("image")[region])

    def annotated_labels(self, region: tuple[slice, ...] = ()) -> np.ndarray:
        """(A, ...) uint8 masks of the annotated channels only, in `channels` order."""
        packed = np.asarray(self._map("labels")[(slice(None), *region)])
        return np.unpackbits(packed, axis=0, count=len(self.channels))

    def labels(self, region: tuple[slice, ...] = ()) -> np.ndarray:
        """(K, ...) uint8 multi-hot target; unannotated channels are zeros."""
        ann = self.annotated_labels(region)
        out = np.zeros((self.num_classes, *ann.shape[1:]), dtype=np.uint8)
        out[self.channels] = ann
        return out

    @property
    def has_structure(self) -> bool:
        return (self.path / "structure.npy").is_file()

    def structure(self, region: tuple[slice, ...] = ()) -> np.ndarray:
        """The int16 structure map (see `structure_map`); only entries built with `structure=True` have one."""
        return np.asarray(self._map("structure")[region])

    def locations(self) -> dict[int, np.ndarray]:
        """Sampled voxel positions (n, 3) per annotated class index that has any voxel."""
        with np.load(self.path / "locations.npz") as data:
            return {self.channels[int(c)]: data[c] for c in data.files if len(data[c])}


def _write_entry(final: Path, image: np.ndarray, stack: np.ndarray, channels: list[int], meta: dict,
                 structure: np.ndarray | None = None) -> None:
    """Write all files into a temporary folder beside `final`, then rename it into place (another process
    that wrote the same entry first wins: its arrays may already be memory-mapped by a reader)."""
    with atomic_dir(final, replace=False) as tmp:
        np.save(tmp / "image.npy", image)
        np.save(tmp / "labels.npy", np.packbits(stack, axis=0))
        if structure is not None:
            np.save(tmp / "structure.npy", structure)
        rng = np.random.default_rng(int(meta["key"][:8], 16))
        np.savez(tmp / "locations.npz", **_locations(stack, rng))
        (tmp / "meta.json").write_text(json.dumps({**meta, "channels": channels, "shape": list(image.shape)}))
    if not (final / "meta.json").is_file():  # a folder in the way that is no complete entry
        raise InputError(f"cache entry {final} is incomplete; remove it and run again")


def _plain(preprocessing: Preprocessing) -> SimpleNamespace:
    """The settings preprocessing needs, as a plain object (cheap to send to a worker process)."""
    return SimpleNamespace(orientation=preprocessing.orientation, spacing=list(preprocessing.spacing),
                           hu_window=list(preprocessing.hu_window), foreground_crop=preprocessing.foreground_crop)


def _build(args: tuple) -> str:
    """Preprocess one case and store it (module level so a process pool can run it)."""
    case, spec, class_keys, preprocessing, final, key, structure = args
    image, stack, channels, ids = preprocess_entry(case, spec, class_keys, preprocessing, structure)
    meta = {"version": CACHE_VERSION, "key": key, "dataset": spec.name, "case": case.case_id,
            "class_keys": list(class_keys), "spacing": [float(s) for s in preprocessing.spacing],
            "created": time.time()}
    _write_entry(Path(final), image, stack, channels, meta, ids)
    return case.case_id


class PreprocessedCache:
    """Preprocessed cases on disk, one folder per case and settings (see the module docstring).

    Args:
        cache_dir: the cache's folder.
        structure_maps: entries also hold the case's structure map (the generalisation augmentation's).
    """

    def __init__(self, cache_dir: str | Path, structure_maps: bool = False):
        self.root = Path(cache_dir)
        self.structure_maps = structure_maps

    def path(self, case: Case, spec: DatasetSpec, class_keys: list[str], preprocessing: Preprocessing) -> Path:
        key = case_key(case, spec, class_keys, preprocessing, self.structure_maps)
        return self.root / safe_file_name(spec.name) / f"{safe_file_name(case.case_id)}-{key[:16]}"

    def has(self, case: Case, spec: DatasetSpec, class_keys: list[str], preprocessing: Preprocessing) -> bool:
        return (self.path(case, spec, class_keys, preprocessing) / "meta.json").is_file()

    def get(self, case: Case, spec: DatasetSpec, class_keys: list[str], preprocessing: Preprocessing) -> CachedCase:
        """The cached case, preprocessing it first when missing."""
        path = self.path(case, spec, class_keys, preprocessing)
        if not (path / "meta.json").is_file():
            _build((case, spec, list(class_keys), preprocessing, str(path), path.name.rsplit("-", 1)[1],
                    self.structure_maps))
        return CachedCase.open(path)

    def ensure(self, specs: list[DatasetSpec], class_keys: list[str], preprocessing: Preprocessing,
               progress: CountFn | None = None, workers: int = 0) -> int:
        """Preprocess every case of `specs` that has no entry yet; returns how many were computed.

        `workers` > 1 runs a process pool; `progress(done, total, case_id)` is called after each case.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp()
        todo = []
        for spec in specs:
            for case in spec.cases:
                path = self.path(case, spec, class_keys, preprocessing)
                if not (path / "meta.json").is_file():
                    todo.append((case, spec, list(class_keys), _plain(preprocessing), str(path),
                                 path.name.rsplit("-", 1)[1], self.structure_maps))
        if workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                for done, case_id in enumerate(pool.map(_build, todo), 1):
                    if progress:
                        progress(done, len(todo), case_id)
        else:
            for done, args in enumerate(todo, 1):
                _build(args)
                if progress:
                    progress(done, len(todo), args[0].case_id)
        return len(todo)

    def _remove_stale_tmp(self) -> None:
        """Temporary folders of killed runs are never read; remove them once they are clearly abandoned."""
        now = time.time()
        for tmp in self.root.glob("*/.tmp-*"):
            try:
                if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(tmp, ignore_errors=True)
            except OSError:
                pass

