"""Bring one class's probability from the model grid back onto the input's exact grid.

Linear interpolation with SimpleITK (physical coordinates, so any orientation and spacing map
exactly), then the threshold. Only the part of the input grid that can reach the threshold is
resampled: a linearly interpolated value is a convex combination of its (up to 8) neighbours, so
it can exceed the threshold only within one voxel of a model-grid voxel that does. The box of such
voxels, grown by a safety margin, is mapped to the input grid through its corners; the result is
identical to resampling the whole volume, at a cost that follows the structure's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import cc3d
import numpy as np
import SimpleITK as sitk

from UniversalSegLib.inference.masks import BoxMask, bounding_box
from UniversalSegLib.inference.preprocess import ModelGrid

MARGIN = 2  # model-grid voxels around the above-threshold box (1 is enough; 2 absorbs rounding)
PROBABILITY_FLOOR = 0.5 / 255  # below this a uint8 probability map stores 0


@dataclass
class Restored:
    """One class on the input grid."""

    mask: BoxMask
    mean_confidence: float
    probability: np.ndarray | None  # uint8 (z, y, x) full size, only when asked
    values: np.ndarray | None = None  # uint8 probability of the mask's voxels (C order), only when asked


def _lps_to_index(reference: sitk.Image) -> np.ndarray:
    """4x4 matrix from LPS millimetres to the reference's continuous (x, y, z) index."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.reshape(reference.GetDirection(), (3, 3)) @ np.diag(reference.GetSpacing())
    matrix[:3, 3] = reference.GetOrigin()
    return np.linalg.inv(matrix)


def input_box(grid: ModelGrid, start: np.ndarray, stop: np.ndarray,
              reference: sitk.Image) -> tuple[np.ndarray, np.ndarray] | None:
    """The (x, y, z) index box of the reference covering model-grid voxels [start, stop), or None if outside."""
    corners = np.array([[*c, 1.0] for c in product(*zip(start - 0.5, stop - 0.5))]).T
    index = (_lps_to_index(reference) @ grid.index_to_lps @ corners)[:3]
    size = np.array(reference.GetSize())
    lo = np.maximum(0, np.floor(index.min(axis=1)).astype(int) - 1)
    hi = np.minimum(size, np.ceil(index.max(axis=1)).astype(int) + 2)
    return (lo, hi) if np.all(hi > lo) else None


def to_input_grid(probability: np.ndarray, grid: ModelGrid, reference: sitk.Image, threshold: float,
                  keep_probability: bool = False, largest_only: bool = False, keep_values: bool = False) -> Restored:
    """Resample an (x, y, z) model-grid probability onto `reference`'s grid and threshold it.

    `largest_only` keeps the largest connected component (the mean confidence is then over it);
    `keep_values` also returns the mask voxels' probabilities, for confidences after later rules.
    """
    shape_zyx = tuple(reversed(reference.GetSize()))
    floor = PROBABILITY_FLOOR if keep_probability else threshold
    box = bounding_box(probability > floor)
    empty = Restored(BoxMask.empty(shape_zyx), 0.0, np.zeros(shape_zyx, np.uint8) if keep_probability else None,
                     np.zeros(0, np.uint8) if keep_values else None)
    if box is None:
        return empty
    lo = np.maximum(0, np.array(box[0]) - MARGIN)
    hi = np.minimum(probability.shape, np.array(box[1]) + MARGIN)
    target = input_box(grid, lo, hi, reference)
    if target is None:
        return empty
    t_lo, t_hi = target
    source = grid.sub_image(probability[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], tuple(int(v) for v in lo))
    origin = reference.TransformIndexToPhysicalPoint([int(v) for v in t_lo])
    values = sitk.GetArrayFromImage(sitk.Resample(
        source, [int(v) for v in t_hi - t_lo], sitk.Transform(), sitk.sitkLinear, origin, reference.GetSpacing(),
        reference.GetDirection(), 0.0, sitk.sitkFloat32))  # (z, y, x)
    inside = values > threshold
    if largest_only and inside.any():
        inside = cc3d.largest_k(inside, k=1, connectivity=26) > 0
    inside_values = values[inside]
    mean = float(inside_values.mean(dtype=np.float64)) if inside_values.size else 0.0
    mask = BoxMask(shape_zyx, tuple(int(v) for v in reversed(t_lo)), inside)
    full = None
    if keep_probability:
        full = np.zeros(shape_zyx, np.uint8)
        z, y, x = (slice(int(a), int(b)) for a, b in zip(reversed(t_lo), reversed(t_hi)))
        full[z, y, x] = np.rint(values * 255.0).astype(np.uint8)
    kept = np.rint(inside_values * 255.0).astype(np.uint8) if keep_values else None
    return Restored(mask, mean, full, kept)


def _model_x_of_input(grid: ModelGrid, reference: sitk.Image) -> np.ndarray:
    """Coefficients (a, b, c, d): model-grid x index of input voxel (x, y, z) is a*x + b*y + c*z + d."""
    return (np.linalg.inv(grid.index_to_lps) @ np.linalg.inv(_lps_to_index(reference)))[0]


class SlabRestorer:
    """`to_input_grid` for a probability arriving as consecutive x-slabs of the model grid.

    Each slab is resampled on its own (with the previous slab's last row, so interpolation across
    the seam is exact): an input voxel belongs to the slab whose rows hold both of its x-neighbours,
    i.e. whose model-x lies in [first row, last row). Only above-threshold voxels (and their
    probabilities as uint16, when a rule or the caller needs them) are kept per slab; `finish`
    assembles them.
    """

    def __init__(self, grid: ModelGrid, reference: sitk.Image, threshold: float, keep_probability: bool = False,
                 largest_only: bool = False, keep_values: bool = False):
        self.grid, self.reference, self.threshold = grid, reference, threshold
        self.keep_probability, self.largest_only, self.keep_values = keep_probability, largest_only, keep_values
        self.shape_zyx = tuple(reversed(reference.GetSize()))
        self._x_coeffs = _model_x_of_input(grid, reference)
        self._previous: np.ndarray | None = None  # last row of the previous slab
        self._pieces: list[tuple] = []  # (start zyx, packed inside, uint16 values or None, box shape)
        self._sum, self._count = 0.0, 0

    @property
    def _need_values(self) -> bool:
        return self.keep_probability or self.largest_only or self.keep_values

    def add(self, start: int, slab: np.ndarray, last: bool) -> None:
        """Take model-grid rows start..start+len(slab) (x, y, z float32); `last`: the volume's final rows."""
        rows = slab if self._previous is None else np.concatenate([self._previous[None], slab])
        first = start - (len(rows) - len(slab))
        lower = -np.inf if self._previous is None else float(first)
        upper = np.inf if last else float(start + len(slab) - 1)
        self._previous = None if last else slab[-1].copy()
        floor = PROBABILITY_FLOOR if self.keep_probability else self.threshold
        box = bounding_box(rows > floor)
        if box is None:
            return
        lo = np.maximum(0, np.array(box[0]) - MARGIN)
        hi = np.minimum(rows.shape, np.array(box[1]) + MARGIN)
        offset = np.array([first, 0, 0])
        target = input_box(self.grid, lo + offset, hi + offset, self.reference)
        if target is None:
            return
        t_lo, t_hi = target
        source = self.grid.sub_image(rows[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], tuple(int(v) for v in lo + offset))
        origin = self.reference.TransformIndexToPhysicalPoint([int(v) for v in t_lo])
        values = sitk.GetArrayFromImage(sitk.Resample(
            source, [int(v) for v in t_hi - t_lo], sitk.Transform(), sitk.sitkLinear, origin,
            self.reference.GetSpacing(), self.reference.GetDirection(), 0.0, sitk.sitkFloat32))  # (z, y, x)
        self._keep_own_rows(values, t_lo, lower, upper)
        self._store(values, tuple(int(v) for v in reversed(t_lo)))

    def _keep_own_rows(self, values: np.ndarray, t_lo: np.ndarray, lower: float, upper: float) -> None:
        """Zero the voxels (z, y, x box at input index t_lo) whose model-x lies outside [lower, upper)."""
        a = self._x_coeffs
        axes = [np.arange(t_lo[i], t_lo[i] + values.shape[2 - i], dtype=np.float64) for i in range(3)]  # x, y, z
        if np.count_nonzero(np.abs(a[:3]) > 1e-12) == 1:  # input axes parallel to the model's: one 1D test
            i = int(np.flatnonzero(np.abs(a[:3]) > 1e-12)[0])
            model_x = a[i] * axes[i] + a[3]
            outside = (model_x < lower) | (model_x >= upper)
            index = [slice(None)] * 3
            index[2 - i] = outside
            values[tuple(index)] = 0.0
            return
        plane = a[0] * axes[0][None, :] + a[1] * axes[1][:, None] + a[3]  # (y, x)
        for k, z in enumerate(axes[2]):  # oblique: plane by plane, no full-box coordinate array
            model_x = plane + a[2] * z
            values[k][(model_x < lower) | (model_x >= upper)] = 0.0

    def _store(self, values: np.ndarray, start_zyx: tuple[int, int, int]) -> None:
        inside = values > self.threshold
        kept = (values > PROBABILITY_FLOOR) if self.keep_probability else inside
        box = bounding_box(kept)
        if box is None:
            return
        crop = tuple(slice(a, b) for a, b in zip(*box))
        inside, values = inside[crop], values[crop]
        if not self._need_values:
            self._sum += float(values[inside].sum(dtype=np.float64))
            self._count += int(np.count_nonzero(inside))
        quantised = np.rint(np.clip(values, 0.0, 1.0) * 65535.0).astype(np.uint16) if self._need_values else None
        start = np.array(start_zyx) + np.array(box[0])
        self._pieces.append((start, np.packbits(inside, axis=None), quantised, inside.shape))

    def finish(self) -> Restored:
        """The class on the input grid (as `to_input_grid` returns it)."""
        if not self._pieces:
            return Restored(BoxMask.empty(self.shape_zyx),
                            0.0, np.zeros(self.shape_zyx, np.uint8) if self.keep_probability else None,
                            np.zeros(0, np.uint8) if self.keep_values else None)
        lo = np.min([p[0] for p in self._pieces], axis=0)
        hi = np.max([p[0] + np.array(p[3]) for p in self._pieces], axis=0)
        inside = np.zeros(tuple(hi - lo), bool)
        quantised = np.zeros(tuple(hi - lo), np.uint16) if self._need_values else None
        for start, bits, q, shape in self._pieces:  # disjoint voxels; boxes may overlap (zeros elsewhere)
            region = tuple(slice(s, s + n) for s, n in zip(start - lo, shape))
            inside[region] |= np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)
            if quantised is not None:
                np.maximum(quantised[region], q, out=quantised[region])
        self._pieces = []
        if self.largest_only and inside.any():
            inside = cc3d.largest_k(inside, k=1, connectivity=26) > 0
        if quantised is not None:
            picked = quantised[inside]
            mean = float(picked.mean(dtype=np.float64)) / 65535.0 if picked.size else 0.0
            quantised = np.rint(quantised / 257.0).astype(np.uint8)  # 65535 = 255 * 257
        else:
            mean = self._sum / self._count if self._count else 0.0
        mask = BoxMask(self.shape_zyx, tuple(int(v) for v in lo), inside)
        full = None
        if self.keep_probability:
            full = np.zeros(self.shape_zyx, np.uint8)
            full[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))] = quantised
        kept = quantised[inside] if self.keep_values else None
        return Restored(mask, mean, full, kept)
