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

import numpy as np
import SimpleITK as sitk

from UniversalSegLib.components import connected_components, largest_k
from UniversalSegLib.geometry import ijk_to_lps
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
    return np.linalg.inv(ijk_to_lps(reference))


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
    """Resample a whole (x, y, z) model-grid probability onto `reference`'s grid and threshold it.

    `largest_only` keeps the largest connected component (the mean confidence is then over it);
    `keep_values` also returns the mask voxels' probabilities, for confidences after later rules.
    """
    restorer = SlabRestorer(grid, reference, threshold, keep_probability, largest_only, keep_values)
    restorer.add(0, probability, last=True)
    return restorer.finish()


def _model_x_of_input(grid: ModelGrid, reference: sitk.Image) -> np.ndarray:
    """Coefficients (a, b, c, d): model-grid x index of input voxel (x, y, z) is a*x + b*y + c*z + d."""
    return (np.linalg.inv(grid.index_to_lps) @ np.linalg.inv(_lps_to_index(reference)))[0]


@dataclass
class _Piece:
    """One slab's above-threshold voxels on the input grid (a box at `start`, (z, y, x))."""

    start: np.ndarray
    shape: tuple[int, int, int]
    bits: np.ndarray  # packed mask of the box
    probability: np.ndarray | None  # uint8 box, only when the caller keeps probabilities
    values: np.ndarray | None  # uint8 of the mask's voxels (C order), only when a later rule needs them
    components: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # (a voxel of each, sum, count), largest_only

    def region(self, origin: np.ndarray) -> tuple[slice, ...]:
        return tuple(slice(int(a), int(a + n)) for a, n in zip(self.start - origin, self.shape))

    def mask(self) -> np.ndarray:
        return np.unpackbits(self.bits, count=int(np.prod(self.shape))).reshape(self.shape).astype(bool)


def _component_sums(inside: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per connected component of `inside`: the flat index of one of its voxels, its values' sum, its size."""
    labels, n = connected_components(inside, connectivity=26, return_N=True)
    where = np.flatnonzero(labels)
    label = labels.ravel()[where]
    voxel = np.zeros(n + 1, np.int64)
    voxel[label] = where  # any voxel of a component identifies it
    sums = np.bincount(label, weights=values.ravel()[where], minlength=n + 1)
    return voxel[1:], sums[1:], np.bincount(label, minlength=n + 1)[1:]


class SlabRestorer:
    """`to_input_grid` for a probability arriving as consecutive x-slabs of the model grid.

    Each slab is resampled on its own (with the previous slab's last row, so interpolation across
    the seam is exact): an input voxel belongs to the slab whose rows hold both of its x-neighbours,
    i.e. whose model-x lies in [first row, last row). Per slab only the packed mask is kept, plus
    uint8 probabilities where the caller or a later rule needs them. The mean confidence is summed
    exactly as the slabs pass; for the largest-component rule it is summed per connected component
    of each slab (each lies inside one component of the whole mask), so no per-voxel values are
    held for it.
    """

    def __init__(self, grid: ModelGrid, reference: sitk.Image, threshold: float, keep_probability: bool = False,
                 largest_only: bool = False, keep_values: bool = False):
        self.grid, self.reference, self.threshold = grid, reference, threshold
        self.keep_probability, self.largest_only, self.keep_values = keep_probability, largest_only, keep_values
        self.shape_zyx = tuple(reversed(reference.GetSize()))
        self._x_coeffs = _model_x_of_input(grid, reference)
        self._previous: np.ndarray | None = None  # last row of the previous slab
        self._pieces: list[_Piece] = []
        self._sum, self._count = 0.0, 0

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
        picked = values[inside]
        components = None
        if self.largest_only:
            components = _component_sums(inside, values)
        else:
            self._sum += float(picked.sum(dtype=np.float64))
            self._count += int(picked.size)
        self._pieces.append(_Piece(
            start=np.array(start_zyx) + np.array(box[0]), shape=inside.shape, bits=np.packbits(inside, axis=None),
            probability=_to_uint8(values) if self.keep_probability else None,
            values=_to_uint8(picked) if self.keep_values else None, components=components))

    def finish(self) -> Restored:
        """The class on the input grid (as `to_input_grid` returns it)."""
        if not self._pieces:
            return Restored(BoxMask.empty(self.shape_zyx),
                            0.0, np.zeros(self.shape_zyx, np.uint8) if self.keep_probability else None,
                            np.zeros(0, np.uint8) if self.keep_values else None)
        lo = np.min([p.start for p in self._pieces], axis=0)
        hi = np.max([p.start + np.array(p.shape) for p in self._pieces], axis=0)
        inside = np.zeros(tuple(hi - lo), bool)
        probability = np.zeros(tuple(hi - lo), np.uint8) if self.keep_probability else None
        values = np.zeros(tuple(hi - lo), np.uint8) if self.keep_values else None
        for piece in self._pieces:  # disjoint voxels; boxes may overlap (zeros elsewhere)
            region, mask = piece.region(lo), piece.mask()
            inside[region] |= mask
            if probability is not None:
                np.maximum(probability[region], piece.probability, out=probability[region])
            if values is not None:
                values[region][mask] = piece.values
        total, count = self._sum, self._count
        if self.largest_only and inside.any():
            inside = largest_k(inside, k=1, connectivity=26) > 0
            total, count = 0.0, 0
            for piece in self._pieces:  # a slab's component is in the largest iff one of its voxels is
                voxel, sums, sizes = piece.components
                index = np.unravel_index(voxel, piece.shape)
                chosen = inside[tuple(i + int(o) for i, o in zip(index, piece.start - lo))]
                total += float(sums[chosen].sum())
                count += int(sizes[chosen].sum())
        self._pieces = []
        mean = total / count if count else 0.0
        mask = BoxMask(self.shape_zyx, tuple(int(v) for v in lo), inside)
        full = None
        if probability is not None:
            full = np.zeros(self.shape_zyx, np.uint8)
            full[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))] = probability
        kept = values[inside] if values is not None else None
        return Restored(mask, mean, full, kept)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as uint8 (the storage of every probability UniversalSeg hands out)."""
    return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
