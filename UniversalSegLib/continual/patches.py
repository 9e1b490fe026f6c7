"""Training patches from in-memory extension cases: image, new-class masks and old-class pseudo-labels.

Centres are drawn as in training (foreground:background 2:1; a foreground centre is a voxel of one of
the case's annotated new classes), patches are zero-padded where the case is smaller, and the
papers' augmentation (`data.training_transforms`) is applied to the image and all targets together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from UniversalSegLib.continual.data import ExtensionCase

LOCATIONS_PER_CLASS = 4096


@dataclass
class Batch:
    """image (B,1,*p); new (B,K_new,*p) in {0,1}; annotated (B,K_new); pseudo (B,K_old,*p) in [0,1] or None."""

    image: torch.Tensor
    new: torch.Tensor
    annotated: torch.Tensor
    pseudo: torch.Tensor | None


def _crop(array: np.ndarray, start: np.ndarray, size: np.ndarray) -> np.ndarray:
    """array (..., X, Y, Z) -> (..., *size) starting at `start` (may lie outside; zero padded)."""
    shape = np.array(array.shape[-3:])
    lo, hi = np.maximum(start, 0), np.minimum(start + size, shape)
    out = np.zeros((*array.shape[:-3], *size), dtype=array.dtype)
    src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
    out[(..., *dst)] = array[(..., *src)]
    return out


class PatchSampler:
    """Random patches of `cases`; `pseudo(case)` gives its uint8 old-class probabilities (or None)."""

    def __init__(self, cases: Sequence[ExtensionCase], patch_size: Sequence[int], seed: int = 0,
                 pseudo: Callable[[ExtensionCase], np.ndarray] | None = None, augment: bool = True,
                 fg_fraction: float = 2 / 3):
        self.cases, self.size = list(cases), np.array([int(p) for p in patch_size])
        self.rng = np.random.default_rng(seed)
        self.pseudo, self.fg_fraction = pseudo, fg_fraction
        self.transforms = None
        if augment:
            from UniversalSegLib.data import training_transforms

            self.transforms = training_transforms(tuple(self.size))
            self.transforms.set_random_state(seed=seed)
        self._locations = [self._foreground(c) for c in self.cases]

    def _foreground(self, case: ExtensionCase) -> list[np.ndarray]:
        out = []
        for k in np.flatnonzero(case.annotated):
            where = np.argwhere(case.labels[k])
            if len(where) > LOCATIONS_PER_CLASS:
                where = where[self.rng.choice(len(where), LOCATIONS_PER_CLASS, replace=False)]
            if len(where):
                out.append(where)
        return out

    def _start(self, i: int) -> np.ndarray:
        shape = np.array(self.cases[i].shape)
        locations = self._locations[i]
        if locations and self.rng.random() < self.fg_fraction:
            points = locations[int(self.rng.integers(len(locations)))]
            centre = points[int(self.rng.integers(len(points)))]
        else:
            centre = np.array([int(self.rng.integers(s)) for s in shape])
        start = centre - self.size // 2
        return np.clip(start, np.minimum(0, shape - self.size), np.maximum(0, shape - self.size))

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """One patch: image (1,*p) float32, new (K_new,*p), annotated (K_new,), pseudo (K_old,*p) or None."""
        sizes = np.array([np.prod(c.shape) for c in self.cases], dtype=float)
        i = int(self.rng.choice(len(self.cases), p=sizes / sizes.sum()))  # bigger cases give more patches
        case, start = self.cases[i], self._start(i)
        image = _crop(case.image, start, self.size).astype(np.float32)[None]
        new = _crop(case.labels, start, self.size).astype(np.float32)
        pseudo = None
        if self.pseudo is not None:
            pseudo = _crop(self.pseudo(case), start, self.size).astype(np.float32) / 255.0
        if self.transforms is not None:
            targets = new if pseudo is None else np.concatenate([new, pseudo])
            out = self.transforms({"image": image, "label": targets})
            image, targets = np.asarray(out["image"]), np.asarray(out["label"])
            new, pseudo = targets[: len(new)], (None if pseudo is None else targets[len(new):])
        return image, new, case.annotated.copy(), pseudo

    def batch(self, size: int) -> Batch:
        items = [self.sample() for _ in range(size)]
        stack = lambda j: torch.from_numpy(np.stack([it[j] for it in items]))  # noqa: E731
        return Batch(stack(0), stack(1), stack(2), None if items[0][3] is None else stack(3))
