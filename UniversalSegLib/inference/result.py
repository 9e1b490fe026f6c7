"""What a prediction returns: per-class masks on the input's exact grid, with metadata.

Arrays use SimpleITK's array order (z, y, x), i.e. `sitk.GetArrayViewFromImage(reference)`;
`reference` carries the input's spacing, origin and direction, so every writer restores the
geometry exactly. Masks overlap freely (a voxel can be liver AND liver tumour).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from UniversalSegLib.inference.masks import BoxMask
from UniversalSegLib.registry import ClassInfo


class ClassResult:
    """One structure: its binary mask and how sure the model was.

    The mask is stored compactly (its bounding box, bit-packed: see `BoxMask`), so a result with
    hundreds of classes stays small; `mask` expands it to a full (z, y, x) bool array on each
    access (read it once per use, and assign `mask` to change it: editing the returned array in
    place changes nothing). `box` gives the compact form without expanding it.
    """

    def __init__(self, info: ClassInfo, mask: np.ndarray | BoxMask, mean_confidence: float,
                 probability: np.ndarray | None = None, reason: str = ""):
        self.info = info
        self.reason = reason  # why the mask was cut or flagged by the plausibility check ("" if not)
        self.mask = mask
        self.mean_confidence = float(mean_confidence)  # mean sigmoid probability inside the mask (0 if empty)
        self.probability = probability  # uint8 0..255 on the input grid, kept only when asked

    @property
    def mask(self) -> np.ndarray:
        """bool, (z, y, x) on the input grid (a new array on each access)."""
        return self.box.array()

    @mask.setter
    def mask(self, value: np.ndarray | BoxMask) -> None:
        self.box = value if isinstance(value, BoxMask) else BoxMask.from_array(np.asarray(value, dtype=bool))

    @property
    def voxel_count(self) -> int:
        return self.box.count

    def __repr__(self) -> str:
        return (f"ClassResult({self.info.key!r}, voxels={self.box.count}, "
                f"mean_confidence={self.mean_confidence:.3f})")


@dataclass
class SegmentationResult:
    """All requested structures of one image, plus the image itself for statistics and previews."""

    reference: sitk.Image  # the input image (HU), geometry source for every output
    classes: list[ClassResult]
    model_name: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> ClassResult:
        for c in self.classes:
            if c.info.key == key:
                return c
        raise KeyError(key)

    @property
    def keys(self) -> list[str]:
        return [c.info.key for c in self.classes]
