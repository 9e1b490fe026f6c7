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

from UniversalSegLib.registry import ClassInfo


@dataclass
class ClassResult:
    """One structure: its binary mask and how sure the model was."""

    info: ClassInfo
    mask: np.ndarray  # bool, (z, y, x) on the input grid
    mean_confidence: float  # mean sigmoid probability inside the mask (0 if empty)
    probability: np.ndarray | None = None  # uint8 0..255 on the input grid, kept only when asked


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
