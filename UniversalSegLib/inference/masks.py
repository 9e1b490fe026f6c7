"""A compact binary mask: its bounding box inside the full grid, bit-packed.

A structure usually fills a small part of a CT, so keeping only its bounding box (8 voxels per
byte) makes a result's memory follow the structures' sizes instead of (classes x volume).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Index3 = tuple[int, int, int]


def bounding_box(mask: np.ndarray) -> tuple[Index3, Index3] | None:
    """(start, stop) of the True voxels of a 3D bool array, or None when there are none."""
    start, stop = [], []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return None
        start.append(int(hit[0]))
        stop.append(int(hit[-1]) + 1)
    return tuple(start), tuple(stop)  # type: ignore[return-value]


class BoxMask:
    """A bool mask of `shape` (z, y, x), stored as the bit-packed contents of its tight bounding box."""

    __slots__ = ("shape", "start", "box_shape", "count", "_bits")

    def __init__(self, shape: Sequence[int], start: Sequence[int], crop: np.ndarray):
        """`crop` holds the mask's voxels from `start` on; it is tightened to its True voxels."""
        self.shape: Index3 = tuple(int(s) for s in shape)  # type: ignore[assignment]
        crop = np.asarray(crop, dtype=bool)
        box = bounding_box(crop)
        if box is None:
            self.start, self.box_shape, self.count = (0, 0, 0), (0, 0, 0), 0
            self._bits = np.zeros(0, dtype=np.uint8)
            return
        lo, hi = box
        crop = crop[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        self.start = tuple(int(s) + int(o) for s, o in zip(start, lo))  # type: ignore[assignment]
        self.box_shape = crop.shape
        self.count = int(np.count_nonzero(crop))
        self._bits = np.packbits(crop, axis=None)

    @classmethod
    def from_array(cls, mask: np.ndarray) -> BoxMask:
        return cls(mask.shape, (0, 0, 0), mask)

    @classmethod
    def empty(cls, shape: Sequence[int]) -> BoxMask:
        return cls(shape, (0, 0, 0), np.zeros((0, 0, 0), dtype=bool))

    @property
    def stop(self) -> Index3:
        return tuple(s + n for s, n in zip(self.start, self.box_shape))  # type: ignore[return-value]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return int(self._bits.nbytes)

    def __bool__(self) -> bool:
        return self.count > 0

    def crop(self) -> np.ndarray:
        """The bounding box's contents as a new bool array."""
        n = int(np.prod(self.box_shape))
        return np.unpackbits(self._bits, count=n).view(bool).reshape(self.box_shape)

    def array(self) -> np.ndarray:
        """The full-size bool mask (a new array)."""
        out = np.zeros(self.shape, dtype=bool)
        if self.count:
            out[self.slices] = self.crop()
        return out

    def region(self, start: Sequence[int], stop: Sequence[int], values: np.ndarray | None = None) -> np.ndarray:
        """The mask's voxels inside the box [start, stop) of the full grid, as a new bool array; with
        `values` (one per mask voxel, C order, as a restorer keeps them) those values, 0 off the mask."""
        out = np.zeros([b - a for a, b in zip(start, stop)], dtype=bool if values is None else values.dtype)
        lo = [max(a, s) for a, s in zip(start, self.start)]
        hi = [min(b, s) for b, s in zip(stop, self.stop)]
        if self.count and all(h > low for low, h in zip(lo, hi)):
            dst = tuple(slice(low - a, h - a) for low, h, a in zip(lo, hi, start))
            src = tuple(slice(low - s, h - s) for low, h, s in zip(lo, hi, self.start))
            crop = self.crop()
            if values is not None:
                crop, inside = np.zeros(self.box_shape, values.dtype), crop
                crop[inside] = values
            out[dst] = crop[src]
        return out

    def overlaps(self, other: BoxMask) -> bool:
        """Whether the two masks' bounding boxes share a voxel (cheap: nothing is unpacked)."""
        return bool(self.count and other.count and all(
            max(a, b) < min(c, d) for a, b, c, d in zip(self.start, other.start, self.stop, other.stop)))


def union_box(masks: Sequence[BoxMask], pad: Sequence[int] = (0, 0, 0)) -> tuple[Index3, Index3] | None:
    """The box holding every non-empty mask, grown by `pad` voxels per axis and clipped to the grid."""
    full = [m for m in masks if m.count]
    if not full:
        return None
    shape = full[0].shape
    start = tuple(max(0, min(m.start[a] for m in full) - pad[a]) for a in range(3))
    stop = tuple(min(shape[a], max(m.stop[a] for m in full) + pad[a]) for a in range(3))
    return start, stop  # type: ignore[return-value]
