"""Spatial training transforms: field of view, slice coverage, partial organs, zoom and elastic/affine deformation.

Every transform is a callable on a sample dict with torch tensors on any device, per sample or batched:

=================  =========================  ==============================
key                per sample                 batched
=================  =========================  ==============================
``image``          float (1, D, H, W) in [0,1]  (B, 1, D, H, W)
``label``          float multi-hot (K, D, H, W) (B, K, D, H, W)
``structure_map``  int16 (D, H, W), optional  (B, D, H, W)
``annotated``      bool (K,), optional        (B, K)
=================  =========================  ==============================

The image is in model space: HU clipped to [-175, 250] and scaled to [0, 1], so air (and anything
below the window) is 0. Spatial dims follow a RAS array (nibabel / MONAI order): dim 0 increases
toward the patient's right, dim 1 toward anterior, dim 2 toward superior (`Axes` changes that).
Nothing here ever mirrors an axis: the model has left/right classes.

This module also holds the small base shared with `synth.py`: a per-sample probability, a
reproducible generator that is re-seeded per DataLoader worker, and per-sample/batched handling.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IMAGE, LABEL, STRUCTURES, ANNOTATED = "image", "label", "structure_map", "annotated"
TABLE_ID = 255  # structure id of a patient table (see synth.EXTRA_STRUCTURES)
HU_MIN, HU_MAX = -175.0, 250.0  # the model's intensity window: hu = value * 425 - 175

_instance_counter = itertools.count()


def hu_to_window(hu: torch.Tensor | float, clip: bool = True) -> torch.Tensor | float:
    """HU -> model intensity space [0, 1] (clipped; with `clip=False` only scaled, for steps before the end
    of an augmentation pipeline)."""
    x = (hu - HU_MIN) / (HU_MAX - HU_MIN)
    if not clip:
        return x
    return x.clamp(0.0, 1.0) if isinstance(hu, torch.Tensor) else min(max(x, 0.0), 1.0)


def window_to_hu(x: torch.Tensor) -> torch.Tensor:
    """Model intensity space -> HU (values outside the window come back at its limits)."""
    return x * (HU_MAX - HU_MIN) + HU_MIN


@dataclass(frozen=True)
class Axes:
    """Which spatial dim (0, 1, 2 of D, H, W) is which anatomical axis.

    `posterior_low`: the posterior side of the body has the low indices along `ap`.
    """

    lr: int = 0
    ap: int = 1
    si: int = 2
    posterior_low: bool = True


RAS_AXES = Axes()


# ----------------------------------------------------------------------------------------------- base


def to_batch(data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A shallow copy of `data` with a leading batch dim on the known keys; True when one was added."""
    out = dict(data)
    if IMAGE not in out:
        raise ValueError("sample has no 'image'")
    for key in (IMAGE, LABEL, STRUCTURES, ANNOTATED):
        if key in out and out[key] is not None and not isinstance(out[key], torch.Tensor):
            out[key] = torch.as_tensor(out[key])
    single = out[IMAGE].ndim == 4
    if out[IMAGE].ndim not in (4, 5):
        raise ValueError(f"image must be (C, D, H, W) or (B, C, D, H, W), got {tuple(out[IMAGE].shape)}")
    if single:
        for key in (IMAGE, LABEL, STRUCTURES, ANNOTATED):
            if out.get(key) is not None:
                out[key] = out[key].unsqueeze(0)
    return out, single


def from_batch(data: dict[str, Any], single: bool) -> dict[str, Any]:
    """Undo `to_batch`."""
    if single:
        for key in (IMAGE, LABEL, STRUCTURES, ANNOTATED):
            if data.get(key) is not None:
                data[key] = data[key][0]
    return data


def spatial_shape(data: dict[str, Any]) -> tuple[int, int, int]:
    return tuple(data[IMAGE].shape[-3:])


class RandomTransform:
    """Base of the random transforms: probability `p` per sample and a reproducible generator.

    With `seed` set, a transform gives the same stream in every run; inside a DataLoader worker the
    seed is offset by the worker id so workers do not repeat each other. With `seed=None` the stream
    is drawn from torch's global seed (which the DataLoader already varies per worker).
    Subclasses implement `apply(batch)` on batched dicts (see `to_batch`).
    """

    def __init__(self, p: float = 1.0, seed: int | None = None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability p must be in [0, 1], got {p}")
        self.p = float(p)
        self.seed = seed
        self._per_worker = True
        self._salt = next(_instance_counter)
        self._gen: torch.Generator | None = None
        self._owner: tuple[int, int] | None = None
        self._device_gens: dict[str, torch.Generator] = {}

    def __getstate__(self) -> dict[str, Any]:
        # generators are per process: a pickled copy (spawned worker) seeds its own
        state = dict(self.__dict__)
        state.update(_gen=None, _owner=None, _device_gens={})
        return state

    def set_seed(self, seed: int | None, per_worker: bool = True) -> RandomTransform:
        """Restart the random stream from `seed` (offset per DataLoader worker unless `per_worker=False`)."""
        self.seed, self._per_worker, self._gen = seed, per_worker, None
        return self

    def set_random_state(self, seed: int | None = None, state: Any = None) -> RandomTransform:
        """MONAI-style re-seeding (the patch loader calls it once per patch): exactly `seed`, in any worker."""
        return self.set_seed(seed, per_worker=False)

    @property
    def generator(self) -> torch.Generator:
        """The CPU generator for this process / worker (created lazily)."""
        info = torch.utils.data.get_worker_info()
        owner = (os.getpid(), info.id if info is not None else -1)
        if self._gen is None or owner != self._owner:
            worker = max(owner[1], 0) if self._per_worker else 0
            if self.seed is None:
                seed = hash((torch.initial_seed(), self._salt, worker)) % (2**62)
            else:
                seed = int(self.seed) + 1_000_003 * worker
            self._gen, self._owner, self._device_gens = torch.Generator().manual_seed(seed), owner, {}
        return self._gen

    # small random numbers come from the CPU generator; big fields are drawn on the data's device
    def uniform(self, lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape or (1,), generator=self.generator)

    def log_uniform(self, lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.exp(self.uniform(math.log(lo), math.log(hi), *shape))

    def randint(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi] (both included)."""
        return int(torch.randint(lo, hi + 1, (1,), generator=self.generator))

    def chance(self, p: float, n: int = 1) -> torch.Tensor:
        """(n,) bool: each True with probability p."""
        return torch.rand(n, generator=self.generator) < p

    def randn(self, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """Standard normal field on `device`, reproducible from this transform's stream."""
        if device.type == "cpu":
            return torch.randn(tuple(shape), generator=self.generator)
        key = str(device)
        if key not in self._device_gens:
            self._device_gens[key] = torch.Generator(device=device)
        gen = self._device_gens[key].manual_seed(int(torch.randint(2**62, (1,), generator=self.generator)))
        return torch.randn(tuple(shape), generator=gen, device=device)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        batch, single = to_batch(data)
        return from_batch(self.apply(batch), single)

    def apply(self, batch: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class PerSampleTransform(RandomTransform):
    """A transform written for one sample at a time (its output shape may depend on the sample).

    `apply_one` gets and returns a batch of one; batched inputs are split, transformed and stacked
    again, which needs every output to have the same shape.
    """

    def apply(self, batch: dict[str, Any]) -> dict[str, Any]:
        n = batch[IMAGE].shape[0]
        fire = self.chance(self.p, n)
        outs = []
        for b in range(n):
            one = {k: (v[b:b + 1] if _is_batched_key(k, v) else v) for k, v in batch.items()}
            outs.append(self.apply_one(one) if fire[b] else one)
        if n == 1:
            return outs[0]
        shapes = {spatial_shape(o) for o in outs}
        if len(shapes) > 1:
            raise ValueError(f"{type(self).__name__} changed the size of batched samples differently ({shapes}); "
                             "apply it per sample or keep the size")
        merged = dict(batch)
        for key in (IMAGE, LABEL, STRUCTURES, ANNOTATED):
            if batch.get(key) is not None:
                merged[key] = torch.cat([o[key] for o in outs])
        return merged

    def apply_one(self, one: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


def _is_batched_key(key: str, value: Any) -> bool:
    return key in (IMAGE, LABEL, STRUCTURES, ANNOTATED) and isinstance(value, torch.Tensor)


# ----------------------------------------------------------------------------------------------- warping


def _rotation(angle: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, 3, 3) rotations by `angle` (radians, (B,)) in the plane of the two dims other than `dim`."""
    i, j = [d for d in range(3) if d != dim]
    rot = torch.eye(3).repeat(angle.shape[0], 1, 1)
    c, s = torch.cos(angle), torch.sin(angle)
    rot[:, i, i], rot[:, i, j], rot[:, j, i], rot[:, j, j] = c, -s, s, c
    return rot


def sampling_grid(shape: Sequence[int], matrix: torch.Tensor, offset: torch.Tensor,
                  displacement: torch.Tensor | None = None) -> torch.Tensor:
    """A `grid_sample` grid (B, D, H, W, 3) that reads input voxel `centre + matrix @ (p - centre) + offset`.

    `matrix` (B, 3, 3) and `offset` (B, 3) act on voxel coordinates of output point p (spatial dims
    in D, H, W order); `displacement` (B, 3, D, H, W), in voxels, is added afterwards.
    """
    device = matrix.device
    centre = torch.tensor([(n - 1) / 2 for n in shape], device=device)
    axes = [torch.arange(n, device=device, dtype=torch.float32) - c for n, c in zip(shape, centre)]
    base = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (D, H, W, 3)
    coords = torch.einsum("bij,dhwj->bdhwi", matrix, base) + (offset + centre)[:, None, None, None, :]
    if displacement is not None:
        coords = coords + displacement.permute(0, 2, 3, 4, 1)
    sizes = torch.tensor([max(n - 1, 1) for n in shape], device=device, dtype=torch.float32)
    return (2.0 * coords / sizes - 1.0).flip(-1)  # grid_sample wants (x=W, y=H, z=D)


def warp_sample(batch: dict[str, Any], grid: torch.Tensor, label_mode: str = "nearest",
                select: torch.Tensor | None = None) -> dict[str, Any]:
    """Resample image (linear, air outside), label (linear + threshold 0.5, or nearest) and structure map
    (nearest) with one grid. `select` (B,) bool restricts the change to some samples."""
    out = dict(batch)
    n = batch[IMAGE].shape[0]
    idx = torch.arange(n) if select is None else torch.nonzero(select.cpu()).flatten()
    if idx.numel() == 0:
        return out
    whole = idx.numel() == n
    idx = idx.to(batch[IMAGE].device)
    grid = grid if whole else grid[idx.to(grid.device)]

    def take(key: str) -> torch.Tensor:
        return batch[key] if whole else batch[key][idx]  # fancy indexing copies: avoid it when all are selected

    def put(key: str, value: torch.Tensor) -> None:
        if whole:
            out[key] = value.to(out[key].dtype)
            return
        full = out[key].clone()
        full[idx] = value.to(full.dtype)
        out[key] = full

    image = take(IMAGE).float()
    put(IMAGE, F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode="zeros", align_corners=True))
    if batch.get(LABEL) is not None:
        put(LABEL, _warp_label(take(LABEL), grid, label_mode))
    if batch.get(STRUCTURES) is not None:
        ids = take(STRUCTURES).float().unsqueeze(1)
        moved = F.grid_sample(ids, grid, mode="nearest", padding_mode="zeros", align_corners=True)
        put(STRUCTURES, moved.squeeze(1).round())
    return out


_BITS = 24  # float32 holds integers up to 2**24 exactly


def _warp_label(label: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """Resample the non-empty channels of a multi-hot label. "nearest" packs 24 channels as bits into one
    float channel (exact under nearest sampling), so the cost hardly grows with the number of classes."""
    present = torch.nonzero(label.flatten(2).amax(dim=(0, 2)) > 0).flatten().tolist()
    warped = torch.zeros_like(label)
    if mode != "nearest":
        for c in present:
            moved = F.grid_sample(label[:, c:c + 1].float(), grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=True)
            warped[:, c:c + 1] = moved >= 0.5
        return warped
    for start in range(0, len(present), _BITS):
        group = present[start:start + _BITS]
        packed = torch.zeros((label.shape[0], 1, *label.shape[2:]), device=label.device)
        for bit, c in enumerate(group):
            packed.add_((label[:, c:c + 1] > 0.5).float(), alpha=float(2**bit))
        code = F.grid_sample(packed, grid, mode="nearest", padding_mode="zeros", align_corners=True)
        code = code.round().to(torch.int32)
        for bit, c in enumerate(group):
            warped[:, c:c + 1] = (code >> bit) & 1
    return warped


def _as_triple(value: float | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if len(value) != 3:
        raise ValueError(f"expected one value or three, got {value!r}")
    return tuple(float(v) for v in value)


class RandomDeformation(RandomTransform):
    """Strong affine + elastic deformation, batched on any device (one `grid_sample` per tensor).

    Parameters:
        p: probability per sample.
        axial_rotation_deg: max |rotation| about the superior-inferior axis (in the axial plane).
        tilt_deg: max |rotation| about the left-right and anterior-posterior axes.
        scale: (min, max) of the isotropic scale, drawn log-uniformly; >1 shows more anatomy (zoom out).
        anisotropy: extra independent per-axis scale jitter (fraction).
        translate: max |shift| per axis as a fraction of the size.
        elastic_std_mm: std of the random displacement at the control points (max displacement ~3x);
            each sample draws its own strength uniformly in [0, elastic_std_mm].
        elastic_points: control points per axis of the smooth displacement field.
        p_elastic: probability that a deformed sample also gets the elastic part.
        spacing_mm: voxel spacing of the samples, so rotations are rigid in millimetres.
        label_mode: "bilinear" (smooth, then threshold 0.5; one interpolation per non-empty channel) or
            "nearest" (channels packed as bits, 24 per interpolation: much cheaper on CPU).
        axes: which dims are LR/AP/SI. No transform here has a reflection (determinant > 0).
    """

    def __init__(self, p: float = 0.8, axial_rotation_deg: float = 15.0, tilt_deg: float = 5.0,
                 scale: tuple[float, float] = (0.8, 1.2), anisotropy: float = 0.05, translate: float = 0.05,
                 elastic_std_mm: float = 4.0, elastic_points: int = 5, p_elastic: float = 0.7,
                 spacing_mm: float | Sequence[float] = 1.5, label_mode: str = "nearest",
                 axes: Axes = RAS_AXES, seed: int | None = None):
        super().__init__(p, seed)
        if label_mode not in ("bilinear", "nearest"):
            raise ValueError(f"label_mode must be 'bilinear' or 'nearest', got {label_mode!r}")
        if scale[0] <= 0 or scale[0] > scale[1]:
            raise ValueError(f"scale must be 0 < min <= max, got {scale}")
        self.axial_rotation_deg, self.tilt_deg = axial_rotation_deg, tilt_deg
        self.scale, self.anisotropy, self.translate = scale, anisotropy, translate
        self.elastic_std_mm, self.elastic_points, self.p_elastic = elastic_std_mm, elastic_points, p_elastic
        self.spacing_mm, self.label_mode, self.axes = _as_triple(spacing_mm), label_mode, axes

    def matrices(self, n: int) -> torch.Tensor:
        """(n, 3, 3) voxel-space sampling matrices: rotations in mm, then scales; det > 0 always."""
        deg = math.pi / 180.0
        rot = _rotation(self.uniform(-self.axial_rotation_deg, self.axial_rotation_deg, n) * deg, self.axes.si)
        for dim in (self.axes.lr, self.axes.ap):
            rot = rot @ _rotation(self.uniform(-self.tilt_deg, self.tilt_deg, n) * deg, dim)
        scale = self.log_uniform(*self.scale, n)[:, None] * (1 + self.uniform(-self.anisotropy, self.anisotropy, n, 3))
        spacing = torch.tensor(self.spacing_mm)
        return torch.diag(1 / spacing) @ rot @ torch.diag_embed(scale) @ torch.diag(spacing)

    def displacement(self, n: int, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """(n, 3, D, H, W) smooth random displacement in voxels (control points, trilinear upsampling)."""
        k = self.elastic_points
        coarse = self.randn((n, 3, k, k, k), device)
        strength = self.uniform(0, self.elastic_std_mm, n) * self.chance(self.p_elastic, n)
        coarse = coarse * (strength[:, None] / torch.tensor(self.spacing_mm)[None, :]).to(device)[..., None, None, None]
        return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)

    def apply(self, batch: dict[str, Any]) -> dict[str, Any]:
        n, shape, device = batch[IMAGE].shape[0], spatial_shape(batch), batch[IMAGE].device
        fire = self.chance(self.p, n)
        if not fire.any():
            return batch
        offset = self.uniform(-self.translate, self.translate, n, 3) * torch.tensor(shape, dtype=torch.float32)
        grid = sampling_grid(shape, self.matrices(n).to(device), offset.to(device), self.displacement(n, shape, device))
        return warp_sample(batch, grid, self.label_mode, select=fire)


class RandomZoom(RandomTransform):
    """Random zoom about the centre keeping the size (MONAI RandZoomd-like): zoom < 1 shows a larger field
    of view (padding with air), zoom > 1 a smaller one. No flips.

    Parameters:
        p: probability per sample.
        zoom: (min, max) zoom factor, drawn log-uniformly.
        in_plane_only: zoom only the axial plane (the slice spacing stays), else all three axes.
        label_mode: see `RandomDeformation`.
    """

    def __init__(self, p: float = 0.2, zoom: tuple[float, float] = (0.6, 1.5), in_plane_only: bool = True,
                 label_mode: str = "nearest", axes: Axes = RAS_AXES, seed: int | None = None):
        super().__init__(p, seed)
        self.zoom, self.in_plane_only, self.label_mode, self.axes = zoom, in_plane_only, label_mode, axes

    def apply(self, batch: dict[str, Any]) -> dict[str, Any]:
        n, shape, device = batch[IMAGE].shape[0], spatial_shape(batch), batch[IMAGE].device
        fire = self.chance(self.p, n)
        if not fire.any():
            return batch
        factors = self.log_uniform(*self.zoom, n)[:, None].repeat(1, 3)
        if self.in_plane_only:
            factors[:, self.axes.si] = 1.0
        matrix = torch.diag_embed(1.0 / factors).to(device)
        grid = sampling_grid(shape, matrix, torch.zeros(n, 3, device=device))
        return warp_sample(batch, grid, self.label_mode, select=fire)


# ----------------------------------------------------------------------------------------------- coverage


def _annotated_foreground(one: dict[str, Any]) -> torch.Tensor | None:
    """(D, H, W) bool: any annotated label channel, or None when the sample has no label."""
    label = one.get(LABEL)
    if label is None:
        return None
    label = label[0]
    if one.get(ANNOTATED) is not None:
        label = label[one[ANNOTATED][0].to(label.device).bool()]
    return label.amax(dim=0) > 0 if label.shape[0] else None


def _blank(one: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """Set everything outside `keep` (bool, broadcastable to (D, H, W)) to air / no label / no structure."""
    out = dict(one)
    for key in (IMAGE, LABEL, STRUCTURES):
        if one.get(key) is not None:
            out[key] = one[key] * keep.to(one[key].device, one[key].dtype)
    return out


def _index_along(dim: int, start: int, stop: int, ndim_spatial_last: int = 3) -> tuple[slice, ...]:
    """An index selecting [start, stop) along spatial `dim` of a (..., D, H, W) tensor."""
    index = [slice(None)] * ndim_spatial_last
    index[dim] = slice(start, stop)
    return (Ellipsis, *index)


class RandomSlab(PerSampleTransform):
    """Keep a thin slab of contiguous axial slices, as in a short series (e.g. 13-30 slices).

    Parameters:
        p: probability per sample.
        num_slices: (min, max) slab thickness in slices.
        mode: "pad" keeps the size and fills the other slices with air (what sliding-window inference
            feeds the model for a series thinner than the window); "crop" returns only the slab
            (per-sample use, before the loader's patch crop).
        prefer_foreground: centre the slab on annotated foreground when there is any.
    """

    def __init__(self, p: float = 0.2, num_slices: tuple[int, int] = (10, 40), mode: str = "pad",
                 prefer_foreground: bool = True, axes: Axes = RAS_AXES, seed: int | None = None):
        super().__init__(p, seed)
        if mode not in ("pad", "crop"):
            raise ValueError(f"mode must be 'pad' or 'crop', got {mode!r}")
        if not 1 <= num_slices[0] <= num_slices[1]:
            raise ValueError(f"num_slices must be 1 <= min <= max, got {num_slices}")
        self.num_slices, self.mode, self.prefer_foreground, self.axes = num_slices, mode, prefer_foreground, axes

    def apply_one(self, one: dict[str, Any]) -> dict[str, Any]:
        dim = self.axes.si
        size = spatial_shape(one)[dim]
        n = min(self.randint(*self.num_slices), size)
        start = self.randint(0, size - n)
        fg = _annotated_foreground(one) if self.prefer_foreground else None
        if fg is not None and fg.any():
            slices = torch.nonzero(fg.movedim(dim, 0).flatten(1).any(1)).flatten()
            centre = int(slices[self.randint(0, slices.numel() - 1)])
            start = min(max(centre - self.randint(0, n - 1), 0), size - n)
        if self.mode == "crop":
            index = _index_along(dim, start, start + n)
            return {k: (v[index] if k in (IMAGE, LABEL, STRUCTURES) and v is not None else v) for k, v in one.items()}
        keep = torch.zeros(size, dtype=torch.bool)
        keep[start:start + n] = True
        view = [1, 1, 1]
        view[dim] = size
        return _blank(one, keep.view(view))


class RandomPartialOrgan(PerSampleTransform):
    """Cut an annotated structure at the border of the sample, as a scan or a patch edge does.

    One annotated, non-empty label channel is chosen, then an axis and a cut plane that keeps a
    fraction `keep` of the structure's extent. "shift" moves the content so the cut plane lies on the
    sample border (the rest of the sample is filled with air); "blank" leaves the content in place and
    fills the far side of the plane with air. "shift" falls back to "blank" when it would move the
    content by more than `max_shift` of the size.
    """

    def __init__(self, p: float = 0.15, keep: tuple[float, float] = (0.3, 0.8), mode: str = "shift",
                 max_shift: float = 0.3, seed: int | None = None):
        super().__init__(p, seed)
        if mode not in ("shift", "blank"):
            raise ValueError(f"mode must be 'shift' or 'blank', got {mode!r}")
        self.keep, self.mode, self.max_shift = keep, mode, max_shift
        self.last_cut: dict[str, Any] | None = None  # the latest cut, for inspection

    def apply_one(self, one: dict[str, Any]) -> dict[str, Any]:
        label = one.get(LABEL)
        if label is None:
            return one
        valid = label[0].flatten(1).amax(1) > 0
        if one.get(ANNOTATED) is not None:
            valid &= one[ANNOTATED][0].to(valid.device).bool()
        channels = torch.nonzero(valid).flatten()
        if channels.numel() == 0:
            return one
        channel = int(channels[self.randint(0, channels.numel() - 1)])
        mask = label[0, channel] > 0
        dim = self.randint(0, 2)
        size = mask.shape[dim]
        present = torch.nonzero(mask.movedim(dim, 0).flatten(1).any(1)).flatten()
        lo, hi = int(present.min()), int(present.max()) + 1
        cut = lo + max(1, round(float(self.uniform(*self.keep)) * (hi - lo)))
        keep_low = bool(self.chance(0.5))
        if not keep_low:
            cut = hi - (cut - lo)
        shift = (size - cut) if keep_low else -cut
        keep = torch.arange(size) < cut if keep_low else torch.arange(size) >= cut
        view = [1, 1, 1]
        view[dim] = size
        out = _blank(one, keep.view(view))
        shifted = self.mode == "shift" and abs(shift) <= self.max_shift * size
        self.last_cut = {"channel": channel, "dim": dim, "plane": cut, "kept": "low" if keep_low else "high",
                         "shift": shift if shifted else 0}
        return _roll_fill(out, shift, dim) if shifted else out


def _roll_fill(one: dict[str, Any], shift: int, dim: int) -> dict[str, Any]:
    """Shift the content by `shift` voxels along spatial `dim`, filling the vacated side with air."""
    out = dict(one)
    size = spatial_shape(one)[dim]
    for key in (IMAGE, LABEL, STRUCTURES):
        if one.get(key) is None:
            continue
        value = one[key]
        axis = value.ndim - 3 + dim
        moved = torch.zeros_like(value)
        if shift >= 0:
            moved.narrow(axis, shift, size - shift).copy_(value.narrow(axis, 0, size - shift))
        else:
            moved.narrow(axis, 0, size + shift).copy_(value.narrow(axis, -shift, size + shift))
        out[key] = moved
    return out


# ----------------------------------------------------------------------------------------------- field of view


class RandomFOVPad(PerSampleTransform):
    """Pad the axial plane to a large field of view (up to ~500 mm) with air and add a patient table.

    The body lands at a random position in the enlarged plane (random split of the padding). The
    table is a horizontal band posterior to the body: two dense shells (top and bottom surfaces,
    `table_shell_hu`) around a light core (`table_core_hu`), optionally slightly concave, drawn only
    where there is air; it gets the structure id `TABLE_ID` so synthesis paints it too.

    Parameters:
        p: probability per sample.
        fov_mm: (min, max) target in-plane field of view; dims already larger are not padded.
        spacing_mm: in-plane voxel spacing of the samples.
        p_table: probability of drawing the table.
        table_gap_mm, table_thickness_mm, table_width_mm, table_curve_mm: table geometry ranges.
        keep_size: crop back to the input size (a window overlapping >= `min_overlap` of the input
            in each in-plane dim), so it also works on fixed-size patches and batches.
        body_threshold: window value above which a voxel counts as body when finding its back.
    """

    def __init__(self, p: float = 0.25, fov_mm: tuple[float, float] = (350.0, 500.0),
                 spacing_mm: float | Sequence[float] = 1.5, p_table: float = 0.8,
                 table_gap_mm: tuple[float, float] = (0.0, 30.0),
                 table_thickness_mm: tuple[float, float] = (8.0, 30.0),
                 table_width_mm: tuple[float, float] = (380.0, 520.0),
                 table_curve_mm: tuple[float, float] = (0.0, 15.0),
                 table_shell_hu: tuple[float, float] = (150.0, 900.0),
                 table_core_hu: tuple[float, float] = (-600.0, 0.0),
                 keep_size: bool = False, min_overlap: float = 0.6, body_threshold: float = 0.05,
                 axes: Axes = RAS_AXES, seed: int | None = None):
        super().__init__(p, seed)
        self.fov_mm, self.spacing_mm, self.p_table = fov_mm, _as_triple(spacing_mm), p_table
        self.table_gap_mm, self.table_thickness_mm = table_gap_mm, table_thickness_mm
        self.table_width_mm, self.table_curve_mm = table_width_mm, table_curve_mm
        self.table_shell_hu, self.table_core_hu = table_shell_hu, table_core_hu
        self.keep_size, self.min_overlap, self.body_threshold, self.axes = keep_size, min_overlap, body_threshold, axes

    def apply_one(self, one: dict[str, Any]) -> dict[str, Any]:
        shape = spatial_shape(one)
        pads = [(0, 0)] * 3
        for dim in (self.axes.lr, self.axes.ap):
            target = round(float(self.uniform(*self.fov_mm)) / self.spacing_mm[dim])
            extra = max(target - shape[dim], 0)
            before = self.randint(0, extra)
            pads[dim] = (before, extra - before)
        out = self._shift_within(one, shape, pads) if self.keep_size else _pad_air(one, pads)
        return self._add_table(out) if self.chance(self.p_table) else out

    def _add_table(self, one: dict[str, Any]) -> dict[str, Any]:
        image = one[IMAGE][0, 0]
        body = image > self.body_threshold
        if one.get(STRUCTURES) is not None:  # a table already in the image is not the body
            structures = one[STRUCTURES][0]
            body = (body | (structures > 0)) & (structures != TABLE_ID)
        if not body.any():
            return one
        ap, lr = self.axes.ap, self.axes.lr
        profile = body.movedim(ap, 0).flatten(1).any(1)  # which AP rows hold body
        rows = torch.nonzero(profile).flatten()
        back = int(rows.min()) if self.axes.posterior_low else int(rows.max())
        sp_ap, sp_lr = self.spacing_mm[ap], self.spacing_mm[lr]
        gap = float(self.uniform(*self.table_gap_mm)) / sp_ap
        thick = max(float(self.uniform(*self.table_thickness_mm)) / sp_ap, 2.0)
        lr_idx = torch.arange(image.shape[lr], dtype=torch.float32)
        body_lr = torch.nonzero(body.movedim(lr, 0).flatten(1).any(1)).flatten().float()
        centre = float(body_lr.mean()) + float(self.uniform(-20, 20)) / sp_lr
        half = float(self.uniform(*self.table_width_mm)) / sp_lr / 2
        curve = float(self.uniform(*self.table_curve_mm)) / sp_ap * ((lr_idx - centre) / half).clamp(-1, 1) ** 2
        # depth below the table top (in AP voxels) for each (lr, ap) position; the top follows the curve
        ap_idx = torch.arange(image.shape[ap], dtype=torch.float32)
        top = (back - gap) if self.axes.posterior_low else (back + gap)
        sign = 1.0 if self.axes.posterior_low else -1.0
        depth = sign * ((top + sign * curve)[:, None] - ap_idx[None, :])  # (LR, AP)
        inside = (depth >= 0) & (depth < thick) & ((lr_idx - centre).abs() <= half)[:, None]
        shell = inside & ((depth < 1.5) | (depth >= thick - 1.5))
        hu = torch.where(shell, self.uniform(*self.table_shell_hu), self.uniform(*self.table_core_hu))
        plane_dims = sorted((lr, ap))
        if plane_dims != [lr, ap]:
            inside, hu = inside.T, hu.T
        view = [1, 1, 1]
        view[plane_dims[0]], view[plane_dims[1]] = inside.shape
        region = inside.view(view).expand_as(image).to(image.device) & ~body & (image <= self.body_threshold)
        out = dict(one)
        value = hu_to_window(hu.view(view).expand_as(image).to(image.device))
        out[IMAGE] = one[IMAGE].clone()
        out[IMAGE][0, 0] = torch.where(region, value.to(image.dtype), image)
        if one.get(STRUCTURES) is not None:
            out[STRUCTURES] = one[STRUCTURES].clone()
            out[STRUCTURES][0][region] = TABLE_ID
        return out

    def _shift_within(self, one: dict[str, Any], shape: Sequence[int], pads: Sequence[tuple[int, int]]) -> dict:
        """What a window of the input size sees of the padded plane, without building the padded plane:
        the window overlaps the input by >= `min_overlap` per dim, i.e. the content shifts, air fills in."""
        out = one
        for dim in range(3):
            before, after = pads[dim]
            if before + after == 0:
                continue
            slack = round((1.0 - self.min_overlap) * shape[dim])
            start = self.randint(max(before - slack, 0), min(before + slack, before + after))
            if start != before:
                out = _roll_fill(out, before - start, dim)
        return out


def _pad_air(one: dict[str, Any], pads: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """Pad the spatial dims ((before, after) per dim) with air, no label and no structure."""
    if not any(b or a for b, a in pads):
        return one
    flat: list[int] = []
    for before, after in reversed(pads):  # F.pad wants the last dim first
        flat += [before, after]
    out = dict(one)
    for key in (IMAGE, LABEL, STRUCTURES):
        value = one.get(key)
        if value is not None:
            out[key] = F.pad(value.float() if key == STRUCTURES else value, flat).to(value.dtype)
    return out
