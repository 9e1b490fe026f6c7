"""Windows only where the requested classes can be: a coarse pass, then windows re-tiled over its box.

A request for a few classes (`--classes liver`) need not run the backbone over the whole body. The
model first runs once on the volume at half its resolution (twice the model spacing: on the bundled
model's 3 mm grid a 122 x 99 x 112 body becomes one 64^3 window) for the requested classes and their
pair partners only. The box where any of them exceeds a low threshold, grown by a margin, becomes
the region of interest (ROI); the usual sliding window then runs on the ROI cut out of the
full-resolution volume, with windows re-tiled over it (8 windows instead of 27 for the sample's
liver). Classes computed only as helpers (the vessels the liver's overlap rule needs, parents) are
computed inside the ROI too, which is where the requested classes' rules read them.

Outside the ROI every probability is 0. Inside it the windows sit at other positions than on the
full grid, so blending differs slightly: masks are close to, not identical with, a full run's
(benchmarks/bench_subset.py reports the Dice; docs/performance.md). When the coarse pass finds none
of the classes, or the ROI would save little, the full grid runs as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import cc3d
import numpy as np
import torch

from UniversalSegLib.inference.sliding_window import ProbabilitySlab, WindowPlan, class_probabilities, probability_slabs
from UniversalSegLib.model import UniversalModel

COARSE_FACTOR = 2  # the coarse pass sees the volume at twice the model spacing
COARSE_OVERLAP = 0.25
# A voxel counts for the ROI well below the class threshold: the coarse pass is blurrier than the fine
# one, so the box must hold the fine pass's borders too.
COARSE_THRESHOLD = 0.2
# Of the patch, added around the coarse box on every side (16 voxels at 64^3): the coarse box falls short
# of the fine pass's borders by up to ~8 voxels, and a voxel near a window's edge, with little context,
# is predicted worse than where the full grid's windows see it: 1/8 gave liver Dice 0.972 on the sample.
MARGIN_SHARE = 0.25
# Below this share of the full grid's windows (coarse pass included) the ROI is used; above it the
# saving does not pay for masks that differ from the full run's.
MAX_WINDOW_SHARE = 0.7
ZERO_SLAB_ROWS = 32  # rows per all-zero slab handed out outside the ROI

Box = tuple[tuple[int, int], ...]  # (start, stop) per axis


def half_resolution(volume: np.ndarray) -> np.ndarray:
    """The volume averaged over 2 x 2 x 2 blocks (the last block of an odd axis is a partial one)."""
    pooled = torch.nn.functional.avg_pool3d(torch.from_numpy(volume)[None, None], COARSE_FACTOR,
                                            ceil_mode=True)
    return pooled[0, 0].numpy()


def coarse_box(model: UniversalModel, volume: np.ndarray, classes: Mapping[int, bool], patch: Sequence[int],
               device: torch.device, amp: bool = False) -> Box | None:
    """Box (on `volume`'s grid) where any of `classes` exceeds COARSE_THRESHOLD at half resolution.

    Args:
        model: the model, on `device`.
        volume: preprocessed model input (x, y, z) at the model spacing.
        classes: indices into the model's classes -> whether only the largest connected component counts
            (classes whose rule keeps one component: a far false positive must not stretch the box).
        patch: the model's window size.
        device: where the model runs.
        amp: mixed precision as in the fine pass.
    """
    coarse = half_resolution(volume)
    order = list(classes)
    hit = None
    for position, probability in class_probabilities(model, coarse, order, patch, COARSE_OVERLAP, device,
                                                     amp=amp, sw_batch_size=1):
        above = probability > COARSE_THRESHOLD
        if classes[order[position]] and above.any():
            above = cc3d.largest_k(above, k=1, connectivity=26) > 0
        hit = above if hit is None else hit | above
    if hit is None or not hit.any():
        return None
    box = []
    for axis, size in enumerate(volume.shape):
        along = np.flatnonzero(hit.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append((min(size, int(along[0]) * COARSE_FACTOR), min(size, (int(along[-1]) + 1) * COARSE_FACTOR)))
    return tuple(box)


def grown(box: Box, shape: Sequence[int], patch: Sequence[int]) -> Box:
    """`box` plus the margin on every side, at least one patch long per axis where the volume is, clamped."""
    out = []
    for (lo, hi), size, p in zip(box, shape, patch):
        margin = int(round(p * MARGIN_SHARE))
        lo, hi = max(0, lo - margin), min(size, hi + margin)
        short = min(p, size) - (hi - lo)
        if short > 0:  # widen to one patch, as evenly as the volume's ends allow
            lo = max(0, lo - (short + 1) // 2)
            hi = min(size, lo + min(p, size))
            lo = max(0, hi - min(p, size))
        out.append((lo, hi))
    return tuple(out)


def _zero_slabs(position: int, start: int, stop: int, shape: Sequence[int], last: bool) -> Iterator[ProbabilitySlab]:
    """Rows start..stop of all-zero probability, in pieces; the final piece carries `last`."""
    for row in range(start, stop, ZERO_SLAB_ROWS):
        end = min(stop, row + ZERO_SLAB_ROWS)
        yield ProbabilitySlab(position, row, np.zeros((end - row, *shape[1:]), np.float32), last and end == stop)


def embedded(slabs: Iterator[ProbabilitySlab], roi: Box, shape: Sequence[int]) -> Iterator[ProbabilitySlab]:
    """Slabs of the ROI's sliding window placed on the whole grid (zeros outside), rows 0..x-size per class."""
    (x0, x1), (y0, y1), (z0, z1) = roi
    started: set[int] = set()
    for slab in slabs:
        if slab.position not in started:
            started.add(slab.position)
            yield from _zero_slabs(slab.position, 0, x0, shape, last=False)
        values = np.zeros((len(slab.values), *shape[1:]), np.float32)
        values[:, y0:y1, z0:z1] = slab.values
        yield ProbabilitySlab(slab.position, slab.start + x0, values, slab.last and x1 == shape[0])
        if slab.last and x1 < shape[0]:
            yield from _zero_slabs(slab.position, x1, shape[0], shape, last=True)


def subset_probability_slabs(model: UniversalModel, volume: np.ndarray, classes: Sequence[int],
                             patch: Sequence[int], overlap: float, device: torch.device, *,
                             roi_classes: Mapping[int, bool] | None, amp: bool = False,
                             progress: Callable[[float, str], None] | None = None,
                             info: dict | None = None, **kwargs) -> Iterator[ProbabilitySlab]:
    """`probability_slabs` of `classes`, with windows only around where `roi_classes` can be.

    Args:
        model, volume, classes, patch, overlap, device: as for `probability_slabs`.
        roi_classes: the classes whose coarse box bounds the windows (the requested ones and their pair
            partners), each mapped to whether only its largest component counts; None runs the full grid.
        amp: mixed precision (both passes).
        progress: called with (fraction, message); the coarse pass takes the first 5 %.
        info: for a subset (`roi_classes` given), filled with what ran: "window_roi" ([start, stop] per axis
            of the model grid, or None for the full grid), "windows" (coarse pass included) and
            "full_grid_windows"; left empty otherwise (all-class outputs stay as they were).
        kwargs: passed on to `probability_slabs` (sw_batch_size, class_chunk, cache_features).
    """
    info = {} if info is None else info
    roi = _choose_roi(model, volume, roi_classes, patch, overlap, device, amp, info) if roi_classes else None
    fine = (lambda f, m: progress(0.05 + 0.95 * f, m)) if progress and roi_classes else progress
    if roi is None:
        yield from probability_slabs(model, volume, classes, patch, overlap, device, amp=amp, progress=fine, **kwargs)
        return
    crop = np.ascontiguousarray(volume[tuple(slice(lo, hi) for lo, hi in roi)])
    yield from embedded(probability_slabs(model, crop, classes, patch, overlap, device, amp=amp, progress=fine,
                                          **kwargs), roi, volume.shape)


def _choose_roi(model: UniversalModel, volume: np.ndarray, roi_classes: Mapping[int, bool], patch: Sequence[int],
                overlap: float, device: torch.device, amp: bool, info: dict) -> Box | None:
    """The ROI whose windows (plus the coarse pass) are at most MAX_WINDOW_SHARE of the full grid's, or None;
    fills `info` with the window counts."""
    full = len(WindowPlan.make(volume.shape, patch, overlap).starts)
    coarse = len(WindowPlan.make(half_resolution(volume).shape, patch, COARSE_OVERLAP).starts)
    info.update(window_roi=None, windows=full, full_grid_windows=full)
    if 1 + coarse > MAX_WINDOW_SHARE * full:  # a small scan: even a one-window ROI would not pay for the pass
        return None
    info.update(windows=full + coarse)
    box = coarse_box(model, volume, roi_classes, patch, device, amp)
    if box is None:
        return None
    roi = grown(box, volume.shape, patch)
    windows = len(WindowPlan.make([hi - lo for lo, hi in roi], patch, overlap).starts)
    if windows + coarse > MAX_WINDOW_SHARE * full:
        return None
    info.update(window_roi=[list(r) for r in roi], windows=windows + coarse)
    return roi
