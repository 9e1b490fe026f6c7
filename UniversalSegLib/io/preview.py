"""A PNG preview: axial, coronal and sagittal slices of the CT with coloured, outlined masks.

The volume is shown in radiological convention whatever its storage order: array axes are
permuted and flipped (as views, no copies) so rows and columns follow the patient's LPS axes,
and each panel is drawn with its physical aspect ratio.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from UniversalSegLib.geometry import check_masks, full_mask, grid_shape, mask_parts
from UniversalSegLib.inference.result import ClassResult, SegmentationResult
from UniversalSegLib.io.atomic import atomic_write

WINDOW_HU = (-160.0, 240.0)  # soft-tissue window (level 40, width 400)
FILL_ALPHA = 0.35
MAX_LEGEND = 24


def _lps_view(array: np.ndarray, image: sitk.Image) -> tuple[np.ndarray, tuple[float, float, float]]:
    """View `array` (z, y, x) with axes (S, P, L) increasing; returns it and the spacing along those axes."""
    direction = np.array(image.GetDirection()).reshape(3, 3)  # column c: patient direction of index axis c
    axes, flips, spacing = [], [], []
    for patient_axis in (2, 1, 0):  # S, P, L -> numpy axes 0, 1, 2
        index_axis = int(np.argmax(np.abs(direction[patient_axis])))
        axes.append(2 - index_axis)  # numpy order is reversed index order
        flips.append(direction[patient_axis, index_axis] < 0)
        spacing.append(image.GetSpacing()[index_axis])
    if sorted(axes) != [0, 1, 2]:  # strongly oblique: keep the storage order
        return array, tuple(reversed(image.GetSpacing()))
    view = np.transpose(array, axes)
    for axis, flip in enumerate(flips):
        if flip:
            view = np.flip(view, axis)
    return view, tuple(spacing)


def _best_slices(union: np.ndarray) -> tuple[int, int, int]:
    """Per axis, the slice crossing the most masked voxels (the middle slice when nothing was found)."""
    index = []
    for axis, n in enumerate(union.shape):
        counts = union.sum(axis=tuple(a for a in range(3) if a != axis))
        index.append(int(np.argmax(counts)) if counts.any() else n // 2)
    return tuple(index)


def _cuts(view: np.ndarray, index: tuple[int, int, int]) -> list[np.ndarray]:
    """The axial, coronal and sagittal 2D slices of an (S, P, L) view (copies, so the volume can go)."""
    return [np.array(view[index[0]]), np.array(view[:, index[1], :]), np.array(view[:, :, index[2]])]


def _extents(shape: tuple[int, ...], spacing: tuple[float, float, float]) -> list[tuple[float, ...]]:
    """imshow extents in mm: axial rows anterior->posterior and columns right->left (patient's left on the
    viewer's right, radiological convention); coronal and sagittal with superior at the top."""
    (n_s, n_p, n_l), (s, p, left) = shape, spacing
    return [(0, n_l * left, n_p * p, 0), (0, n_l * left, 0, n_s * s), (0, n_p * p, 0, n_s * s)]


def _mask_cuts(result: SegmentationResult) -> tuple[tuple[int, int, int], list[tuple[ClassResult, list[np.ndarray]]]]:
    """The slice indices through the segmented structures, and each non-empty class's three 2D cuts."""
    shape = grid_shape(result.reference)
    union = np.zeros(shape, dtype=bool)
    for c in result.classes:
        slices, crop = mask_parts(c)
        union[slices] |= crop
    index = _best_slices(_lps_view(union, result.reference)[0])
    cuts = []
    for c in result.classes:  # one full-size mask at a time: memory does not grow with the number of classes
        slices, crop = mask_parts(c)
        if crop.any():
            cuts.append((c, _cuts(_lps_view(full_mask(slices, crop, shape), result.reference)[0], index)))
    return index, cuts


def write_preview(result: SegmentationResult, png_path: str | os.PathLike, dpi: int = 110) -> Path:
    """Render the three orthogonal views through the segmented structures to a PNG."""
    # The object-oriented API renders with Agg without touching pyplot's global backend (Slicer has its own).
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    check_masks(result)
    volume, spacing = _lps_view(sitk.GetArrayViewFromImage(result.reference), result.reference)
    index, shown = _mask_cuts(result)
    colors = [np.array(c.info.color) / 255.0 for c, _ in shown]
    fig = Figure(figsize=(15, 5.6), facecolor="black")
    axes = fig.subplots(1, 3)
    titles = ("axial", "coronal", "sagittal")
    for n, (ax, image, extent) in enumerate(zip(axes, _cuts(volume, index), _extents(volume.shape, spacing))):
        origin = "upper" if n == 0 else "lower"
        ax.imshow(image, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], extent=extent, origin=origin,
                  interpolation="nearest")
        overlay = np.zeros((*image.shape, 4))
        for (_, cuts), color in zip(shown, colors):
            overlay[cuts[n]] = (*color, FILL_ALPHA)
        ax.imshow(overlay, extent=extent, origin=origin, interpolation="nearest")
        for (_, cuts), color in zip(shown, colors):
            if cuts[n].any():
                ax.contour(cuts[n].astype(np.uint8), levels=[0.5], colors=[color], linewidths=0.8, extent=extent,
                           origin=origin)
        ax.set_title(titles[n], color="white")
        ax.set_aspect("equal")  # extents are in mm, so equal data aspect is the physical aspect
        ax.axis("off")
    if shown:
        handles = [Patch(color=col, label=c.info.name) for (c, _), col in zip(shown[:MAX_LEGEND], colors)]
        fig.legend(handles=handles, loc="lower center", ncol=min(8, len(handles)), fontsize=8, frameon=False,
                   labelcolor="white")
    fig.suptitle(f"UniversalSeg - {result.model_name}", color="white")
    path = Path(png_path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    return path
