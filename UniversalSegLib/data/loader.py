"""Training patches and validation cases from the preprocessed cache.

`PatchDataset` is a map-style dataset of `samples_per_epoch` patches. Item i is drawn from its own
random stream (seed, epoch, i): a case (datasets uniformly, or each case with probability
proportional to 1/sqrt(its dataset's size)), then a patch centre (foreground:background 2:1; a
foreground centre is a stored voxel of an annotated class chosen uniformly among those present, so
small structures are not starved), then the augmentation. Items are therefore reproducible and
independent of workers and ranks: shard indices with any sampler (e.g. DistributedSampler).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from UniversalSegLib.data.cache import CachedCase, PreprocessedCache
from UniversalSegLib.data.spec import DatasetSpec
from UniversalSegLib.data.transforms import training_transforms
from UniversalSegLib.errors import InputError
from UniversalSegLib.progress import CountFn

if TYPE_CHECKING:
    from UniversalSegLib.store.manifest import Preprocessing

log = logging.getLogger("UniversalSegLib.data")
SAMPLING = ("uniform", "sqrt")


def case_probabilities(dataset_sizes: Sequence[int], sampling: str) -> np.ndarray:
    """Probability of each case (datasets' cases concatenated in order) under a sampling scheme."""
    if sampling not in SAMPLING:
        raise InputError(f"sampling must be one of {SAMPLING}, not {sampling!r}")
    sizes = np.asarray(dataset_sizes, dtype=float)
    per_case = 1.0 / sizes if sampling == "uniform" else 1.0 / np.sqrt(sizes)
    probs = np.repeat(per_case, sizes.astype(int))
    return probs / probs.sum()


class PatchDataset(torch.utils.data.Dataset):
    """Random training patches: dicts {"image": float32 (1,*patch), "label": float32 (K,*patch),
    "annotated": bool (K,), "dataset": str, "case": str}, and "structure_map": int16 (*patch) when
    `structure_maps` (the cache entries then hold one; see data/cache.py). The image is in [0, 1], except
    with `structure_maps`: then HU above the window stay (over 1) for the generalisation pipeline, whose
    last step clips (`synth.ClipToWindow`).

    `label_dtype=torch.uint8` quarters the label's memory (and the cost of allocating and passing it
    between processes: most of an item's time with many classes); the values stay 0/1."""

    def __init__(self, entries: list[tuple[str, str, Path]], probabilities: np.ndarray, num_classes: int,
                 patch_size: Sequence[int], samples_per_epoch: int, seed: int = 0,
                 transforms: Callable | None = None, fg_fraction: float = 2 / 3,
                 label_dtype: torch.dtype = torch.float32, structure_maps: bool = False):
        self.entries = entries  # (dataset, case id, cache folder)
        self.probabilities = np.asarray(probabilities, dtype=float)
        self.num_classes = num_classes
        self.patch_size = tuple(int(p) for p in patch_size)
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed, self.epoch = int(seed), 0
        self.transforms = transforms
        self.fg_fraction = fg_fraction
        self.label_dtype = label_dtype
        self.structure_maps = structure_maps
        self.datasets = list(dict.fromkeys(e[0] for e in entries))
        self._open: dict[int, CachedCase] = {}
        self._locations: dict[int, dict[int, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Draw a different set of patches each epoch (call on every rank/worker-owning process)."""
        self.epoch = int(epoch)

    def _rng(self, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *extra])

    def case_index(self, i: int) -> int:
        """The case item i is drawn from (the first draw of its random stream)."""
        return int(self._rng(i).choice(len(self.entries), p=self.probabilities))

    def __getitem__(self, i: int) -> dict:
        rng = self._rng(i)
        return self.patch(int(rng.choice(len(self.entries), p=self.probabilities)), rng)

    def sample_from(self, dataset: str, i: int) -> dict:
        """Item i of a stream restricted to one dataset (cases uniform): for accumulating gradients per
        dataset before one optimiser step."""
        members = [k for k, e in enumerate(self.entries) if e[0] == dataset]
        if not members:
            raise KeyError(dataset)
        rng = self._rng(i, 1 + self.datasets.index(dataset))
        return self.patch(members[int(rng.integers(len(members)))], rng)

    def _case(self, index: int) -> CachedCase:
        if index not in self._open:  # opened lazily so each worker process has its own memory maps
            self._open[index] = CachedCase.open(self.entries[index][2])
            self._locations[index] = self._open[index].locations()
        return self._open[index]

    def _centre(self, index: int, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        locations = self._locations[index]
        if locations and rng.random() < self.fg_fraction:
            points = locations[list(locations)[int(rng.integers(len(locations)))]]
            return points[int(rng.integers(len(points)))]
        return np.array([int(rng.integers(s)) for s in shape])

    def patch(self, index: int, rng: np.random.Generator) -> dict:
        """A patch of case `index` around a centre drawn from `rng`, padded with zeros where the case is
        smaller than the patch, then augmented."""
        case = self._case(index)
        shape, size = np.array(case.shape), np.array(self.patch_size)
        start = self._centre(index, case.shape, rng) - size // 2
        start = np.clip(start, np.minimum(0, shape - size), np.maximum(0, shape - size))
        lo, hi = np.maximum(start, 0), np.minimum(start + size, shape)
        src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
        whole = bool(np.all(lo == start) and np.all(hi == start + size))
        image = np.zeros((1, *self.patch_size), dtype=np.float32)
        image[(0, *dst)] = case.image(src)
        if whole:  # the usual case: no padding, so no second copy
            ann = case.annotated_labels(src)
        else:
            ann = np.zeros((len(case.channels), *self.patch_size), dtype=np.uint8)
            ann[(slice(None), *dst)] = case.annotated_labels(src)
        if not self.structure_maps:  # without the generalisation pipeline (which clips last) the model gets the window
            np.clip(image, 0.0, 1.0, out=image)
        sample = {"image": image, "label": ann}
        if self.transforms is not None:
            if hasattr(self.transforms, "set_random_state"):
                self.transforms.set_random_state(seed=int(rng.integers(2**31 - 1)))
            sample = self.transforms({"image": image, "label": ann.astype(np.float32)})
        label = torch.zeros((self.num_classes, *self.patch_size), dtype=self.label_dtype)
        label[case.channels] = torch.as_tensor(np.asarray(sample["label"])).to(self.label_dtype)
        out = {"image": torch.as_tensor(np.asarray(sample["image"]), dtype=torch.float32), "label": label,
               "annotated": torch.from_numpy(case.annotated), "dataset": case.dataset, "case": case.case_id}
        if self.structure_maps:  # cropped like the image (a transform here would have to warp it too)
            ids = np.zeros(self.patch_size, dtype=np.int16)
            ids[dst] = case.structure(src)
            out["structure_map"] = torch.from_numpy(ids)
        return out


def _usable(specs: list[DatasetSpec], class_keys: list[str]) -> list[DatasetSpec]:
    keep = []
    for spec in specs:
        if set(spec.classes) & set(class_keys):
            keep.append(spec)
        else:
            log.warning("dataset %s annotates none of the model's classes and is left out", spec.name)
    return keep


def build_training_dataset(specs: list[DatasetSpec], class_keys: list[str], preprocessing: Preprocessing,
                           cache_dir: str | Path, sampling: str = "uniform", patch_size: Sequence[int] | None = None,
                           samples_per_epoch: int = 250, seed: int = 0, transforms: Callable | bool | None = None,
                           *, fg_fraction: float = 2 / 3, prepare: bool = True, workers: int = 0,
                           progress: CountFn | None = None, label_dtype: torch.dtype = torch.float32,
                           structure_maps: bool = False) -> PatchDataset:
    """Fill the cache (all cases, training and held out, unless `prepare` is False) and return the
    patch dataset over the training cases.

    `transforms`: None = `training_transforms(patch_size)`; False = no augmentation; or any callable on
    {"image", "label"} dicts (MONAI Compose is re-seeded per item). `patch_size` defaults to
    `preprocessing.patch_size`. In multi-process training, let one rank run with prepare=True first.
    `structure_maps`: patches carry the case's structure map (for `synth.build_generalisation_pipeline`);
    use it with `transforms=False`, as the loader's transforms would not move it with the image.
    """
    patch_size = tuple(patch_size or preprocessing.patch_size)
    cache = PreprocessedCache(cache_dir, structure_maps)
    specs = _usable(specs, class_keys)
    if prepare:
        cache.ensure(specs, class_keys, preprocessing, progress=progress, workers=workers)
    entries, sizes = [], []
    for spec in specs:
        cases = spec.train_cases()
        if not cases:
            log.warning("dataset %s has no training cases (all held out) and is left out", spec.name)
            continue
        sizes.append(len(cases))
        for case in cases:
            path = cache.path(case, spec, class_keys, preprocessing)
            if not (path / "meta.json").is_file():
                raise InputError(f"case {case.case_id} of {spec.name} is not in the cache {cache.root} "
                                 "(build it with prepare=True)")
            entries.append((spec.name, case.case_id, path))
    if not entries:
        raise InputError("no training cases: every dataset is empty, held out, or annotates none of the classes")
    if transforms is None:
        transforms = training_transforms(patch_size)
    elif transforms is False:
        transforms = None
    return PatchDataset(entries, case_probabilities(sizes, sampling), len(class_keys), patch_size,
                        samples_per_epoch, seed, transforms, fg_fraction, label_dtype, structure_maps)


class ValidationCases:
    """Whole preprocessed cases, re-iterable: dicts {"image": float32 (1,D,H,W), "label": uint8 (K,D,H,W),
    "annotated": bool (K,), "dataset", "case", "spacing"}."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[dict]:
        for path in self.paths:
            case = CachedCase.open(path)
            yield {"image": torch.from_numpy(np.clip(case.image().astype(np.float32), 0.0, 1.0))[None],
                   "label": torch.from_numpy(case.labels()), "annotated": torch.from_numpy(case.annotated),
                   "dataset": case.dataset, "case": case.case_id, "spacing": case.spacing}


def build_validation_cases(specs: list[DatasetSpec], class_keys: list[str], preprocessing: Preprocessing,
                           cache_dir: str | Path, which: str = "val", *, prepare: bool = True,
                           workers: int = 0, progress: CountFn | None = None) -> ValidationCases:
    """The held-out cases (`which="val"`), the training cases ("train") or all of them ("all")."""
    if which not in ("val", "train", "all"):
        raise InputError(f"which must be val, train or all, not {which!r}")
    cache = PreprocessedCache(cache_dir)
    specs = _usable(specs, class_keys)
    pick = {"val": DatasetSpec.val_cases, "train": DatasetSpec.train_cases, "all": lambda s: s.cases}[which]
    chosen = [DatasetSpec(s.name, pick(s), s.classes) for s in specs]
    if prepare:
        cache.ensure(chosen, class_keys, preprocessing, progress=progress, workers=workers)
    return ValidationCases([cache.path(c, s, class_keys, preprocessing) for s in chosen for c in s.cases])
