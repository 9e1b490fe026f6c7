"""Preprocessing of training cases, and an on-disk cache so epochs never re-resample a volume.

`preprocess_case` turns one case into arrays on the model's grid: RAS, `spacing` mm (image linear,
labels nearest), HU clipped to `hu_window` and scaled to [0, 1], cropped to the body as inference crops
it (`geometry.crop_box`), and a multi-hot target in the model's class order with the papers' rules.

`PreprocessedCache` keeps one folder per (case files, labels, annotated classes, preprocessing, class
keys): image.npy (float16), labels.npy (annotated channels bit-packed, uint8), locations.npz (sampled
voxel positions per annotated class, for foreground patch centres) and meta.json. Arrays are
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
from UniversalSegLib.data.spec import Case, DatasetSpec, LabelMapSource, MaskSource
from UniversalSegLib.data.volume import CaseGrid, read_ct, read_label
from UniversalSegLib.errors import InputError
from UniversalSegLib.io.atomic import atomic_dir
from UniversalSegLib.progress import CountFn
from UniversalSegLib.registry import Registry, default_registry, safe_file_name

if TYPE_CHECKING:  # importing the store pulls in the models; pool workers should stay light
    from UniversalSegLib.store.manifest import Preprocessing

CACHE_VERSION = 2  # 2: the body crop is inference's (-500 HU, 6 mm margin), no longer the HU window's low end
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


def preprocess_annotated(case: Case, spec: DatasetSpec, class_keys: list[str], preprocessing: Preprocessing,
                         registry: Registry | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """`preprocess_case` without the unannotated channels: (image float16 (D,H,W), masks bool (A,D,H,W),
    channels: the A annotated indices into `class_keys`). Memory grows with A, not with the model's K."""
    registry = registry or default_registry()
    if str(preprocessing.orientation).upper() != "RAS":
        raise InputError(f"training preprocessing supports orientation RAS only, not {preprocessing.orientation!r}")
    lo, hi = (float(v) for v in preprocessing.hu_window)
    # The crop box is the body as inference finds it (geometry.crop_box), found before resampling so every
    # label volume goes through one cheap crop; new border voxels get `lo`, i.e. 0 after scaling.
    grid = CaseGrid(read_ct(case.image), preprocessing.spacing, bool(preprocessing.foreground_crop))
    image = grid.image(default_hu=lo)
    image = ((np.clip(image, lo, hi) - lo) / (hi - lo)).astype(np.float16)

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


def case_key(case: Case, spec: DatasetSpec, class_keys: list[str], preprocessing: Preprocessing) -> str:
    """Hash of everything the cached arrays depend on (files with mtime and size, label meaning,
    annotated classes, class order and the grid/intensity settings)."""
    sources = [["map", sorted(s.values.items())] if isinstance(s, LabelMapSource) else ["mask", s.key]
               for s in case.labels]
    payload = {
        "version": CACHE_VERSION, "files": [_file_stamp(p) for p in case.files()], "sources": sources,
        "annotated": sorted(spec.classes), "class_keys": list(class_keys),
        "pre": [preprocessing.orientation, [float(s) for s in preprocessing.spacing],
                [float(v) for v in preprocessing.hu_window], bool(preprocessing.foreground_crop)],
    }
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

    def locations(self) -> dict[int, np.ndarray]:
        """Sampled voxel positions (n, 3) per annotated class index that has any voxel."""
        with np.load(self.path / "locations.npz") as data:
            return {self.channels[int(c)]: data[c] for c in data.files if len(data[c])}


def _write_entry(final: Path, image: np.ndarray, stack: np.ndarray, channels: list[int], meta: dict) -> None:
    """Write all files into a temporary folder beside `final`, then rename it into place (another process
    that wrote the same entry first wins: its arrays may already be memory-mapped by a reader)."""
    with atomic_dir(final, replace=False) as tmp:
        np.save(tmp / "image.npy", image)
        np.save(tmp / "labels.npy", np.packbits(stack, axis=0))
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
    case, spec, class_keys, preprocessing, final, key = args
    image, stack, channels = preprocess_annotated(case, spec, class_keys, preprocessing)
    meta = {"version": CACHE_VERSION, "key": key, "dataset": spec.name, "case": case.case_id,
            "class_keys": list(class_keys), "spacing": [float(s) for s in preprocessing.spacing],
            "created": time.time()}
    _write_entry(Path(final), image, stack, channels, meta)
    return case.case_id


class PreprocessedCache:
    """Preprocessed cases on disk, one folder per case and settings (see the module docstring)."""

    def __init__(self, cache_dir: str | Path):
        self.root = Path(cache_dir)

    def path(self, case: Case, spec: DatasetSpec, class_keys: list[str], preprocessing: Preprocessing) -> Path:
        key = case_key(case, spec, class_keys, preprocessing)
        return self.root / safe_file_name(spec.name) / f"{safe_file_name(case.case_id)}-{key[:16]}"

    def has(self, case: Case, spec: DatasetSpec, class_keys: list[str], preprocessing: Preprocessing) -> bool:
        return (self.path(case, spec, class_keys, preprocessing) / "meta.json").is_file()

    def get(self, case: Case, spec: DatasetSpec, class_keys: list[str], preprocessing: Preprocessing) -> CachedCase:
        """The cached case, preprocessing it first when missing."""
        path = self.path(case, spec, class_keys, preprocessing)
        if not (path / "meta.json").is_file():
            _build((case, spec, list(class_keys), preprocessing, str(path), path.name.rsplit("-", 1)[1]))
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
                                 path.name.rsplit("-", 1)[1]))
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

