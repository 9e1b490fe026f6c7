"""Whole-volume probabilities on the model grid, and the cache of the base model's pseudo-labels.

The base model runs once over each training case (the inference engine's sliding window); its sigmoid
probabilities for the old classes are kept as uint8 (0..255, 1/255 resolution) so a case with 32
classes at 1.5 mm costs tens of MB rather than hundreds. Training crops patches out of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from UniversalSegLib.continual.control import ExtensionCancelled
from UniversalSegLib.inference.sliding_window import probability_slabs
from UniversalSegLib.model import UniversalModel


@torch.no_grad()
def predict_probabilities(model: UniversalModel, image: np.ndarray, classes: Sequence[int] | None,
                          patch_size: Sequence[int], overlap: float = 0.5, device: str | torch.device = "cpu",
                          cancelled: Callable[[], bool] | None = None) -> np.ndarray:
    """Sigmoid probabilities (n_classes, *image.shape) as uint8 0..255 for a preprocessed (x, y, z) image.

    Uses the inference engine's sliding window (same windows, blending and float16 features as
    `predict`), so pseudo-labels and scores match what users get; `cancelled` is polled per window.
    """
    was_training = model.training
    model.eval()
    classes = list(range(model.num_classes)) if classes is None else list(classes)
    volume = np.ascontiguousarray(image, dtype=np.float32)
    out = np.empty((len(classes), *volume.shape), dtype=np.uint8)

    def poll(_fraction: float, _message: str) -> None:
        if cancelled is not None and cancelled():
            raise ExtensionCancelled()

    try:
        for slab in probability_slabs(model, volume, classes, list(patch_size), overlap, torch.device(device),
                                      progress=poll):
            rows = slice(slab.start, slab.start + len(slab.values))
            out[slab.position, rows] = np.rint(np.clip(slab.values, 0, 1) * 255)
    finally:
        model.train(was_training)
    return out


class PseudoLabelCache:
    """Soft pseudo-labels of the base model, computed at most once per case."""

    def __init__(self, model: UniversalModel, classes: Sequence[int], patch_size: Sequence[int], overlap: float,
                 device: str | torch.device = "cpu"):
        self.model, self.classes = model, list(classes)
        self.patch_size, self.overlap, self.device = list(patch_size), overlap, device
        self._store: dict[str, np.ndarray] = {}
        self.computed = 0  # how many times the base model actually ran (one per case)

    def get(self, case_id: str, image: np.ndarray, cancelled: Callable[[], bool] | None = None) -> np.ndarray:
        """uint8 probabilities (n_old, *image.shape) for this case; runs the base model only the first time."""
        if case_id not in self._store:
            self._store[case_id] = predict_probabilities(self.model, image, self.classes, self.patch_size,
                                                         self.overlap, self.device, cancelled)
            self.computed += 1
        return self._store[case_id]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._store.values())
